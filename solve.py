"""Solve an inverse problem with a latent diffusion prior and a text prompt (TReg, ICLR 2025, and baselines).

Examples (the official TReg README commands run unchanged; --model picks the prior):

    python solve.py --model analytic --task_config configs/task/super-resolution.yaml --img_path samples/cat_1.jpg \
        --null_prompt "out of focus, depth of field" --prompt "a photo of a cat" --cfg_guidance 5.0 --null_lr 1e-3 --use_AN
    python solve.py --task_config configs/task/gauss-deblur.yaml --img_path samples/ --prompt "a photo" \
        --compare treg,dps,psld,p2l,reddiff,ddim --metrics psnr,ssim,lpips,clip
    accelerate launch --num_processes 4 solve.py --img_path my_folder/ ...        # one shard of the folder per GPU

Outputs in WORKDIR: {input,label,recon,ypred}/NNNNN-<prompt>.png (recon/ypred get a sub-folder per method with
--compare, plus a side-by-side grid in compare/), records/NNNNN.json per image, run.json and metrics.csv.
"""
import argparse
import dataclasses
import platform
import re
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from treg import runs
from treg.config import ConfigError, load_solver, load_task
from treg.diffusion import randn
from treg.images import ImageError, atomic_write, grid, list_images, load_image, save_image, viewable
from treg.metrics import build_metrics
from treg.operators import build_operator
from treg.prior import DEFAULT_MODEL, PriorUnavailable, load_prior
from treg.profiling import OPERATOR_PARTS, PRIOR_PARTS, Profiler
from treg.solvers import SOLVERS, residual_norm

# CLI flags that override a field of the solver config when given (None = use the YAML's value)
SOLVER_FLAGS = ("cfg_guidance", "cg_lamb", "null_lr", "use_AN", "use_DPS", "dps_lamb")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task_config", type=Path, default=Path("configs/task/super-resolution.yaml"),
      help="task YAML: operator, params, noise_scale, image_size (default: %(default)s)")
    a("--solver_config", type=Path, default=Path("configs/solver/treg.yaml"),
      help="solver YAML: `solver:` name and its settings (default: %(default)s)")
    a("--null_prompt", default="", help="text that initialises the null (negative) embedding (default: empty)")
    a("--prompt", default="", help="text describing the solution; also names the output files (default: empty)")
    a("--cfg_guidance", type=float, help="classifier-free guidance weight w; 0 = without text "
      "(default: the solver YAML's; 4.0 for treg, as in the official code)")
    a("--cg_lamb", type=float, help="λ of TReg's CG data-consistency prox (default: YAML, 1e-4)")
    a("--null_lr", type=float, help="Adam learning rate of TReg's adaptive negation (default: YAML, 8e-4)")
    a("--use_AN", action="store_true", default=None, help="turn on adaptive negation (TReg)")
    a("--use_DPS", action="store_true", default=None, help="latent DPS steps (w = 0) between TReg's DC steps")
    a("--dps_lamb", type=float, help="DPS step size of TReg's --use_DPS (default: √ᾱ' at each step)")
    a("--img_path", type=Path, default=Path("."), help="an image file, or a folder solved in sorted order")
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
    a("--compare", help="comma-separated solvers (e.g. treg,dps,psld,p2l,reddiff,ddim), each with "
      "configs/solver/<name>.yaml, run on the same y and seed; writes a grid per image and a table")
    a("--metrics", default="psnr,ssim", help="comma-separated: psnr, ssim, lpips (= lpips_vgg), lpips_alex, "
      "clip; unavailable ones are skipped with one line (default: %(default)s)")
    a("--clip_model", default="openai/clip-vit-large-patch14", help="CLIP model for --metrics clip: hub id or "
      "local folder (default: %(default)s)")
    a("--limit", type=int, help="solve only the first N images of the folder")
    a("--batch_size", type=int, default=1, help="images per solver call (default: %(default)s)")
    a("--skip_existing", action="store_true", help="skip images already complete in WORKDIR (resume a run)")
    a("--gradient_checkpointing", action="store_true",
      help="checkpoint the UNet and VAE activations: less memory for dps/psld/p2l and --use_DPS, more time")
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


def solver_configs(args):
    """[(name, config)]: the --solver_config alone, or every --compare solver's YAML beside it."""
    overrides = {k: getattr(args, k) for k in SOLVER_FLAGS}
    if not args.compare:
        return [load_solver(args.solver_config, SOLVERS, overrides)]
    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    unknown = [n for n in names if n not in SOLVERS]
    if unknown or not names:
        raise ConfigError(f"--compare: unknown solver(s) {', '.join(unknown)}; choose from {', '.join(SOLVERS)}")
    folder = args.solver_config.parent
    out = [load_solver(folder / f"{n}.yaml", SOLVERS, overrides, strict=False) for n in names]
    for key, value in overrides.items():
        if value is not None and not any(hasattr(cfg, key) for _, cfg in out):
            raise ConfigError(f"--{key} applies to none of {', '.join(names)}")
    return out


def output_files(workdir, index, name, methods, compare):
    """{(kind, method): path} for one image; kind is input, label, recon, ypred or compare."""
    stem = f"{index:05d}-{name}.png"
    files = {("input", None): workdir / "input" / stem, ("label", None): workdir / "label" / stem}
    for m in methods:
        sub = Path(m) if compare else Path()
        files[("recon", m)] = workdir / "recon" / sub / stem
        files[("ypred", m)] = workdir / "ypred" / sub / stem
    if compare:
        files[("compare", None)] = workdir / "compare" / stem
    return files


def run(args, state, header):
    """Solve every image of this process's shard; `header` is filled with the run's settings first."""
    device = torch.device(args.device or (state.device if state.num_processes > 1 else None)
                          or torch.accelerator.current_accelerator() or "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             None: torch.float16 if device.type != "cpu" else torch.float32}[args.dtype]

    # Everything that can be wrong with the input is checked before the model loads or any file is written.
    task = load_task(args.task_config, args.image_size)
    solvers = [(name, dataclasses.replace(cfg, sigma_y=task.noise_scale)  # ΠGDM and DDRM model y's noise
                if getattr(cfg, "sigma_y", 0) is None else cfg) for name, cfg in solver_configs(args)]
    try:
        op = build_operator(task.operator, task.image_size, **task.params).to(device)
        metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        metric_fns, notes = build_metrics(metric_names, device=device, clip_model=args.clip_model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.batch_size < 1:
        raise ConfigError("--batch_size must be at least 1")
    paths = list_images(args.img_path)[: args.limit]
    load_image(paths[0], task.image_size)
    for note in notes:
        warnings.warn(note)

    needs_clip = any(getattr(cfg, "use_AN", False) for _, cfg in solvers)
    prior = load_prior(args.model, device, dtype, image_encoder=args.image_encoder if needs_clip else None)
    if not getattr(prior, "has_text", True):  # a pixel diffusion model (treg.pixel): unconditional
        if needs_clip:
            raise ConfigError(f"adaptive negation needs text and '{args.model}' has none; drop --use_AN")
        if "p2l" in dict(solvers):
            raise ConfigError(f"p2l tunes the prompt and '{args.model}' has no text; choose another solver")
        if args.prompt or any(getattr(cfg, "cfg_guidance", 0) > 0 for _, cfg in solvers):
            warnings.warn(f"'{args.model}' is an unconditional pixel model: the prompt and cfg_guidance are ignored")
    if args.gradient_checkpointing and hasattr(prior, "enable_gradient_checkpointing"):
        prior.enable_gradient_checkpointing()
    profiler = Profiler(device)
    prior_p, op_p = profiler.wrap(prior, PRIOR_PARTS), profiler.wrap(op, OPERATOR_PARTS)
    with torch.no_grad():
        uc, c = prior.embed([args.null_prompt, args.prompt]).chunk(2)

    compare = bool(args.compare)
    methods = [name for name, _ in solvers]
    header |= {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "task": dataclasses.asdict(task),
              "solvers": {name: dataclasses.asdict(cfg) for name, cfg in solvers},
              "device": str(device), "dtype": str(dtype).removeprefix("torch."), "versions": versions()}
    name = slug(args.prompt)
    todo = [i for i in range(len(paths))[state.process_index::state.num_processes]
            if not (args.skip_existing and runs.record_path(args.workdir, i).exists())]
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        x = torch.cat([load_image(paths[i], task.image_size) for i in batch]).to(device)
        # One CPU generator per image: the same y and solver noise on every device, batch size and shard.
        gens = [torch.Generator().manual_seed(args.seed + i) for i in batch]
        y = op.A(x)
        y = y + task.noise_scale * randn(y.shape, gens, device)
        after_y = [g.get_state() for g in gens]
        floor = task.noise_scale * y[0].numel() ** 0.5
        results = [{} for _ in batch]
        outputs = {}
        for method, cfg in solvers:
            for g, s in zip(gens, after_y):
                g.set_state(s)  # every method starts from the same noise
            profiler.reset()
            begin = time.perf_counter()
            label = f"[{batch[0] + 1}/{len(paths)}] {method}"
            with tqdm(total=getattr(cfg, "steps", None), desc=label, unit="step", leave=False, file=sys.stderr,
                      disable=not sys.stderr.isatty()) as bar:
                x_hat = SOLVERS[method][0](prior_p, op_p, y, cfg, c=c, uc=uc, generator=gens,
                                           callback=lambda info: bar.update())
            wall = time.perf_counter() - begin
            x_hat = x_hat.clamp(-1, 1)
            outputs[method] = x_hat
            report = profiler.report(wall, len(batch))
            with torch.no_grad():
                residual = residual_norm(op, y, x_hat)
                scores = {k: fn(x_hat, x, [args.prompt] * len(batch)) for k, fn in metric_fns.items()}
            for j in range(len(batch)):
                results[j][method] = {"wall_seconds": round(wall / len(batch), 4), "residual": residual[j].item(),
                                      "noise_floor": floor, "metrics": {k: v[j].item() for k, v in scores.items()},
                                      **report}
        with torch.no_grad():
            y_view = viewable(y, task.image_size)
            y_pred = {m: viewable(op.A(v), task.image_size) for m, v in outputs.items()}
        for j, i in enumerate(batch):
            files = output_files(args.workdir, i, name, methods, compare)
            save_image(y_view[j], files[("input", None)])
            save_image(x[j], files[("label", None)])
            for m in methods:
                save_image(outputs[m][j], files[("recon", m)])
                save_image(y_pred[m][j], files[("ypred", m)])
            if compare:
                sheet = grid([[y_view[j], *(outputs[m][j] for m in methods), x[j]]],
                             ["measurement", *methods, "ground truth"])
                atomic_write(files[("compare", None)], lambda tmp: sheet.save(tmp, format="PNG"))
            record = {"index": i, "path": str(paths[i]), "prompt": args.prompt, "process": state.process_index,
                      "results": results[j],
                      "files": {f"{k}/{m}" if m else k: str(p) for (k, m), p in files.items()}}
            runs.write_json(runs.record_path(args.workdir, i), record)  # written last: marks the image complete
            line = ", ".join(f"{m} residual {r['residual']:.4g}" + "".join(
                f" {k} {v:.4g}" for k, v in r["metrics"].items()) for m, r in results[j].items())
            print(f"[{i + 1}/{len(paths)}] {paths[i].name}: {line} (noise floor {floor:.4g})", file=sys.stderr)


def finish(args, header, state, compare):
    """After every process is done, the main one merges the records into run.json and metrics.csv."""
    state.wait_for_everyone()
    if not state.is_main_process or not runs.read_records(args.workdir):
        return
    summary = runs.merge(args.workdir, header)
    columns = ["residual", "noise_floor", *sorted({k for s in summary.values() for k in s} - {
        "residual", "noise_floor", "wall_seconds", "nfe", "peak_memory_mb", "images"}),
        "wall_seconds", "nfe", "peak_memory_mb", "images"]
    table = runs.markdown_table(summary, columns)
    if compare:
        atomic_write(args.workdir / "compare.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    print(table)


def main(argv=None):
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"
    from accelerate import PartialState
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    # cpu=True lets processes started by `accelerate launch` on a machine without an accelerator (or with
    # --device cpu) form a gloo group instead of running alone
    state = PartialState(cpu=args.device == "cpu" or not torch.accelerator.is_available())
    header = {}
    try:
        run(args, state, header)
    except (ConfigError, ImageError, PriorUnavailable) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        if header and state.is_main_process and runs.read_records(args.workdir):
            runs.merge(args.workdir, header)  # no barrier: the other processes may be gone
        sys.exit("interrupted: finished images are saved; rerun with --skip_existing to resume")
    finish(args, header, state, bool(args.compare))

if __name__ == "__main__":
    main()
