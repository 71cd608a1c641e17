"""Solve an inverse problem with a latent diffusion prior and a text prompt (TReg, ICLR 2025, and baselines).

Examples (the official TReg README commands, plus --model for a local or offline model):

    python solve.py --model analytic --task_config configs/task/super-resolution.yaml \
        --img_path samples/cat.jpg --prompt "a photo of a cat" --cfg_guidance 5.0 --null_lr 1e-3 --use_AN
    python solve.py --task_config configs/task/super-resolution.yaml --null_prompt "out of focus, depth of field" \
        --prompt "a photo of a cat" --img_path samples/cat.jpg --cfg_guidance 5.0 --null_lr 1e-3 --use_AN

Outputs: WORKDIR/{input,label,recon,ypred}/NNNNN-<prompt>.png and WORKDIR/run.json.
"""
import argparse
import dataclasses
import json
import platform
import re
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from treg.config import ConfigError, load_solver, load_task
from treg.diffusion import randn
from treg.images import ImageError, atomic_write, list_images, load_image, save_image, viewable
from treg.operators import build_operator
from treg.prior import DEFAULT_MODEL, PriorUnavailable, load_prior
from treg.profiling import OPERATOR_PARTS, PRIOR_PARTS, Profiler
from treg.solvers import SOLVERS, residual_norm

FOLDERS = ("input", "label", "recon", "ypred")
# CLI flags that override a field of the solver config when given (None = use the YAML's value)
SOLVER_FLAGS = ("cfg_guidance", "cg_lamb", "null_lr", "use_AN", "use_DPS", "dps_lamb")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_config", type=Path, default=Path("configs/task/super-resolution.yaml"),
                   help="task YAML: operator, params, noise_scale, image_size (default: %(default)s)")
    p.add_argument("--solver_config", type=Path, default=Path("configs/solver/treg.yaml"),
                   help="solver YAML: `solver:` name and its settings (default: %(default)s)")
    p.add_argument("--null_prompt", default="", help="text that initialises the null (negative) embedding")
    p.add_argument("--prompt", default="", help="text describing the solution; also names the output files")
    p.add_argument("--cfg_guidance", type=float, help="classifier-free guidance weight w; 0 = without text "
                   "(default: the solver YAML's, 4.0 for treg as in the official code)")
    p.add_argument("--cg_lamb", type=float, help="λ of TReg's CG data-consistency prox (default: YAML, 1e-4)")
    p.add_argument("--null_lr", type=float, help="Adam learning rate of adaptive negation (default: YAML, 8e-4)")
    p.add_argument("--use_AN", action="store_true", default=None, help="turn on adaptive negation")
    p.add_argument("--use_DPS", action="store_true", default=None,
                   help="latent DPS steps (w = 0) between TReg's data-consistency steps")
    p.add_argument("--dps_lamb", type=float, help="DPS step size (default: √ᾱ' at each step)")
    p.add_argument("--img_path", type=Path, default=Path("."),
                   help="an image file, or a folder whose images are solved in sorted order")
    p.add_argument("--workdir", type=Path, default=Path("workdir"), help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42,
                   help="image i (0-based, in sorted order) uses seed+i for its noise (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: the accelerator if any, else cpu)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'analytic' (exact offline test prior), a hub id or a local diffusers folder "
                        "(default: %(default)s)")
    p.add_argument("--image_encoder", default="auto",
                   help="CLIP image encoder for adaptive negation: hub id or folder; 'auto' = MODEL/image_encoder "
                        "if present, else openai/clip-vit-large-patch14")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="model weights dtype (default: fp16 on an accelerator, fp32 on cpu)")
    p.add_argument("--image_size", type=int, help="override the task's image_size")
    p.add_argument("--limit", type=int, help="solve only the first N images of a folder")
    p.add_argument("--skip_existing", action="store_true",
                   help="skip images whose four outputs already exist (resume an interrupted run)")
    return p.parse_args(argv)


def slug(prompt, limit=80):
    """A file-name-safe form of the prompt: ASCII, no path separators or leading dots, at most `limit` chars."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9 ,_+-]+", "_", text).strip(" _")
    return text[:limit].rstrip(" _") or "no-prompt"


def versions():
    import diffusers
    import numpy
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}


def run(args):
    device = torch.device(args.device or (torch.accelerator.current_accelerator() or "cpu"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             None: torch.float16 if device.type != "cpu" else torch.float32}[args.dtype]

    # Everything that can be wrong with the input is checked before the model loads or any file is written.
    task = load_task(args.task_config, args.image_size)
    overrides = {k: getattr(args, k) for k in SOLVER_FLAGS}
    solver_name, solver_cfg = load_solver(args.solver_config, SOLVERS, overrides)
    try:
        op = build_operator(task.operator, task.image_size, **task.params).to(device)
    except ValueError as err:
        raise ConfigError(f"{args.task_config}: {err}") from None
    paths = list_images(args.img_path)[: args.limit]
    load_image(paths[0], task.image_size)

    needs_clip = getattr(solver_cfg, "use_AN", False)
    prior = load_prior(args.model, device, dtype, image_encoder=args.image_encoder if needs_clip else None)
    profiler = Profiler(device)
    prior_p, op_p = profiler.wrap(prior, PRIOR_PARTS), profiler.wrap(op, OPERATOR_PARTS)
    solve = SOLVERS[solver_name][0]
    with torch.no_grad():
        uc, c = prior.embed([args.null_prompt, args.prompt]).chunk(2)

    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "task": dataclasses.asdict(task), "solver": {"name": solver_name, **dataclasses.asdict(solver_cfg)},
              "device": str(device), "dtype": str(dtype).removeprefix("torch."), "versions": versions(), "images": []}
    name = slug(args.prompt)
    for i, path in enumerate(paths):
        files = {f: args.workdir / f / f"{i:05d}-{name}.png" for f in FOLDERS}
        if args.skip_existing and all(p.exists() for p in files.values()):
            continue
        x = load_image(path, task.image_size).to(device)
        g = torch.Generator().manual_seed(args.seed + i)  # on CPU: the same y and noise on every device
        y = op.A(x)
        y = y + task.noise_scale * randn(y.shape, g, device)

        profiler.reset()
        start = time.perf_counter()
        with tqdm(total=getattr(solver_cfg, "steps", None), desc=f"[{i + 1}/{len(paths)}] {solver_name}",
                  unit="step", leave=False, file=sys.stderr) as bar:
            x_hat = solve(prior_p, op_p, y, solver_cfg, c=c, uc=uc, generator=g, callback=lambda info: bar.update())
        wall = time.perf_counter() - start
        with torch.no_grad():
            y_hat = op.A(x_hat)
        for folder, image in zip(FOLDERS, (viewable(y, task.image_size), x, x_hat, viewable(y_hat, task.image_size))):
            save_image(image[0], files[folder])
        residual = residual_norm(op, y, x_hat).item()
        floor = task.noise_scale * y[0].numel() ** 0.5
        record["images"].append({"index": i, "path": str(path), "seconds": round(wall, 3),
                                 "residual": residual, "noise_floor": floor, **profiler.report(wall)})
        print(f"[{i + 1}/{len(paths)}] {path.name}: {wall:.1f} s, residual ‖y − A x̂‖ = {residual:.4g} "
              f"(noise floor {floor:.4g}) -> {files['recon']}", file=sys.stderr)
        atomic_write(args.workdir / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def main(argv=None):
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        run(args)
    except (ConfigError, ImageError, PriorUnavailable) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished images are saved; rerun with --skip_existing to resume")


if __name__ == "__main__":
    main()
