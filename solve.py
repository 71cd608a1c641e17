r"""Solve an inverse problem with a latent diffusion prior and a text prompt (TReg, ICLR 2025, and baselines).

Examples (the official TReg README commands run unchanged; --model picks the prior):

    python solve.py --model analytic --task_config configs/task/super-resolution.yaml --img_path samples/cat_1.jpg \
        --null_prompt "out of focus, depth of field" --prompt "a photo of a cat" --cfg_guidance 5.0 --null_lr 1e-3 \
        --use_AN
    python solve.py --task_config configs/task/gauss-deblur.yaml --img_path samples/ --prompt "a photo" \
        --compare treg,dps,psld,p2l,reddiff,ddim --metrics psnr,ssim,lpips,clip
    accelerate launch --num_processes 4 solve.py --img_path my_folder/ ...        # one shard of the folder per GPU

Outputs in WORKDIR: {input,label,recon,ypred}/NNNNN-<prompt>.png (recon/ypred get a sub-folder per method with
--compare, plus a side-by-side grid in compare/), records/NNNNN.json per image, run.json and metrics.csv.

A workdir holds one run. A run into a workdir whose outputs were made with other settings (prompt, null prompt,
task, solver settings, seed, model, dtype, input images) is refused; --overwrite removes the old run's outputs first,
and another --workdir keeps both. Metrics, --limit, --batch_size, --device and the process count may differ between
the runs of one workdir: a rerun adds or replaces images, and --skip_existing skips the images whose record has these
settings and the same image file (SHA-256).
"""
import argparse
import sys
from pathlib import Path

from treg.config import DEFAULT_MODEL, ConfigError


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --cfg must not pass for --cfg_guidance

    def error(self, message):
        """One line, as for every other bad input (argparse would print its usage block first)."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task_config", type=Path, default=Path("configs/task/super-resolution.yaml"),
      help="task YAML: operator, params, noise_scale, image_size (default: %(default)s)")
    a("--solver_config", type=Path, default=Path("configs/solver/treg.yaml"),
      help="solver YAML: `solver:` name and its settings (default: %(default)s)")
    a("--null_prompt", default="", help="text that initialises the null (negative) embedding (default: empty)")
    a("--prompt", default="", help="text describing the solution; also names the output files (default: empty)")
    a("--steps", type=int, help="number of sampling steps of the solver (every --compare method's); default: "
      "the solver YAML's (200)")
    a("--cfg_guidance", type=float, help="classifier-free guidance weight w; 0 = without text "
      "(default: the solver YAML's; 4.0 for treg, as in the official code)")
    a("--cg_lamb", type=float, help="λ of TReg's CG data-consistency prox (default: YAML, 1e-4)")
    a("--null_lr", type=float, help="Adam learning rate of TReg's adaptive negation (default: YAML, 8e-4)")
    a("--use_AN", action="store_true", default=None, help="turn on adaptive negation (TReg)")
    a("--use_DPS", action="store_true", default=None, help="latent DPS steps (w = 0) between TReg's DC steps")
    a("--dps_lamb", type=float, help="DPS step size of TReg's --use_DPS (default: √ᾱ' at each step)")
    a("--init", choices=["noise", "inversion"], help="EXPERIMENTAL for treg/dps: 'inversion' starts at --init_t "
      "from the RNRI inversion of encode(A⁺y) (default: YAML, noise; see treg.solvers.inversion.warm_start)")
    a("--init_t", type=int, help="with --init inversion: the solver starts at the first step with t ≤ this")
    a("--init_invert_t", type=int, help="with --init inversion: invert down to this t, re-noise to --init_t")
    a("--round_trip", action="store_true", help="diagnostic: invert each solution with its prompt (RNRI, 50 steps, "
      "the solver's w), regenerate it, report round_trip_psnr beside the other metrics")
    a("--img_path", type=Path, default=Path("."), help="an image file, or a folder solved in sorted order")
    a("--use_dataloader", action="store_true", help="solve --dataset's images instead of --img_path (official CLI)")
    a("--dataset", help="with --use_dataloader: food (Food-101's test split), or ffhq, afhq, landscape, imagenet1k "
      "(every image under --root, sorted); see treg/datasets.py")
    a("--root", type=Path, help="with --use_dataloader: the dataset folder (Food-101: holds images/ and meta/)")
    a("--target", help="with --dataset food: one class, by key or name (ice_cream, 'ice cream')")
    a("--workdir", type=Path, default=Path("workdir"), help="output folder (default: %(default)s)")
    a("--seed", type=int, default=42, help="image i (0-based, sorted) uses seed+i for y and the solver's noise, "
      "whatever --limit, --batch_size or the process count (default: %(default)s)")
    a("--device", default=None, help="torch device: cpu, cuda, cuda:1, mps, ... (default: the process's "
      "accelerator if there is one, else cpu)")
    a("--model", default=DEFAULT_MODEL, help="'analytic' or 'analytic-pixel' (exact offline test priors), a hub "
      "id, or a local diffusers folder: Stable Diffusion or an unconditional pixel UNet2DModel (default: %(default)s)")
    a("--image_encoder", default="auto", help="CLIP image encoder for adaptive negation, hub id or folder; "
      "'auto' = MODEL/image_encoder if present, else openai/clip-vit-large-patch14 (default: %(default)s)")
    a("--dtype", choices=["fp16", "bf16", "fp32"], help="model weight dtype (default: fp16 on an accelerator, "
      "fp32 on cpu)")
    a("--image_size", type=int, help="override the task's image_size")
    a("--compare", help="comma-separated names of solver YAMLs beside --solver_config (e.g. treg,dps,psld,p2l,"
      "reddiff,ddim, or variants such as cci,cci-noiseless), run on the same y and seed; writes a grid per image "
      "and a table")
    a("--metrics", default="psnr,ssim", help="comma-separated: psnr, ssim, lpips (= lpips_vgg), lpips_alex, "
      "clip; unavailable ones are skipped with one line (default: %(default)s)")
    a("--metrics_style", default="ours", help="ours: metrics on the output tensors; official: as the official "
      "metric script (per-image min-max stretched 8-bit images, LPIPS fed [0,1]); see treg/metrics.py (default: "
      "%(default)s)")
    a("--clip_model", default="openai/clip-vit-large-patch14", help="CLIP model for --metrics clip: hub id or "
      "local folder (default: %(default)s)")
    a("--limit", type=int, help="solve only the first N (≥ 1) images of the folder")
    a("--batch_size", type=int, default=1, help="images per solver call (default: %(default)s)")
    a("--skip_existing", action="store_true", help="resume a run: skip the images of WORKDIR whose record has "
      "this run's settings and image file")
    a("--overwrite", action="store_true", help="remove the run already in WORKDIR (its PNGs, records, run.json, "
      "metrics.csv, compare.md) before solving; without it, a WORKDIR made with other settings is refused")
    a("--gradient_checkpointing", action="store_true",
      help="checkpoint the UNet and VAE activations: less memory for dps/psld/p2l and --use_DPS, more time")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)  # --help and a bad flag answer here, before torch loads (2-5 s)
    import torch
    from accelerate import PartialState

    from treg import hub, runs
    from treg.commands.solve import NumericalError, finish, run
    from treg.images import ImageError
    from treg.priors.base import PriorUnavailable
    hub.quiet_libraries()
    # cpu=True lets processes started by `accelerate launch` on a machine without an accelerator (or with
    # --device cpu) form a gloo group instead of running alone
    state = PartialState(cpu=args.device == "cpu" or not torch.accelerator.is_available())
    header = {}
    try:
        run(args, state, header)
        finish(args, header, state)
    except (ConfigError, ImageError, PriorUnavailable) as err:
        sys.exit(f"error: {err}")
    except (NumericalError, OSError, KeyboardInterrupt) as err:
        if isinstance(err, KeyboardInterrupt):
            message = "interrupted: finished images are saved; rerun with --skip_existing to resume"
        elif isinstance(err, OSError):
            message = f"error: {err.filename or args.workdir}: {err.strerror or err}"
        else:
            message = f"error: {err}"
        if header and state.is_main_process:
            try:
                runs.merge(args.workdir, header)  # no barrier: the other processes may be gone
            except OSError:
                pass  # the records stay; a rerun with --skip_existing merges them
        if isinstance(err, KeyboardInterrupt):
            print(message, file=sys.stderr)
            sys.exit(130)  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
        sys.exit(message)


if __name__ == "__main__":
    main()
