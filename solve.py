r"""Solve an inverse problem with a latent diffusion prior and a text prompt (TReg, ICLR 2025, and baselines).

Examples (the official TReg README commands run unchanged; --model picks the prior):

    python solve.py --model analytic --task_config configs/task/super-resolution.yaml --img_path samples/cat_1.jpg \
        --null_prompt "out of focus, depth of field" --prompt "a photo of a cat" --cfg_guidance 5.0 --null_lr 1e-3 --use_AN
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
import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from treg import hub, runs
from treg.config import ConfigError, check_value, load_solver, load_task
from treg.datasets import DATASETS, input_images
from treg.images import ImageError, check_image, grid, load_image, viewable
from treg.metrics import build_metrics
from treg.operators import build_operator, measure
from treg.priors.base import PriorUnavailable
from treg.priors.load import DEFAULT_MODEL, load_prior
from treg.profiling import OPERATOR_PARTS, PRIOR_PARTS, Profiler, available_memory, memory_needed
from treg.runs import output_files, slug, write_outputs
from treg.solvers import SOLVERS, with_noise
from treg.solvers.inversion import InversionConfig, round_trip_psnr
from treg.solvers.latent import residual_norm

# CLI flags that override a field of the solver config when given (None = use the YAML's value)
SOLVER_FLAGS = ("steps", "cfg_guidance", "cg_lamb", "null_lr", "use_AN", "use_DPS", "dps_lamb", "init", "init_t",
                "init_invert_t")
SEED_MAX = 2 ** 63 - 1          # torch.Generator.manual_seed takes a signed 64-bit seed; image i uses seed + i


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --cfg must not pass for --cfg_guidance

    def error(self, message):
        """One line, as for every other bad input (argparse would print its usage block first)."""
        self.exit(2, f"error: {message} (see --help)\n")


class NumericalError(RuntimeError):
    """A solver produced NaN or inf; reported as one line naming the method and the step."""


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
    a("--dataset", help="with --use_dataloader: " + ", ".join(DATASETS) + " (food: Food-101's "
      "test split; the others: every image under --root, sorted; see treg/datasets.py)")
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


def versions():
    import diffusers
    import numpy
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}


def load_with_flags(path, overrides, strict=True):
    """load_solver(path) with the flags' values on top; a bad value is blamed on its flag, not on the YAML."""
    _, cfg = load_solver(path, SOLVERS)  # the YAML alone, so that its own errors name the file
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if value is not None and key in fields:
            check_value(value, fields[key], f"--{key}")
    return load_solver(path, SOLVERS, overrides, strict=strict)


def solver_configs(args):
    """[(method, solver, config)]: the --solver_config alone (method = its solver), or every --compare name's YAML
    beside it (method = the YAML's name, so that cci and cci-noiseless are two methods of one solver)."""
    overrides = {k: getattr(args, k) for k in SOLVER_FLAGS}
    if not args.compare:
        solver, cfg = load_with_flags(args.solver_config, overrides)
        return [(solver, solver, cfg)]
    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    paths = [n for n in names if Path(n).name != n or n.startswith(".")]
    if paths:  # a name is also an output folder (recon/<name>/)
        raise ConfigError(f"--compare takes YAML names, not paths: {', '.join(paths)}")
    folder = args.solver_config.parent
    unknown = [n for n in names if not (folder / f"{n}.yaml").is_file()]
    if unknown or not names:
        known = sorted(f.stem for f in folder.glob("*.yaml"))
        raise ConfigError(f"--compare: no {', '.join(f'{n}.yaml' for n in unknown) or 'names'} in {folder}; "
                          f"choose from {', '.join(known)}")
    if len(set(names)) < len(names):
        raise ConfigError(f"--compare: a name is given twice in {args.compare!r}")
    out = [(n, *load_with_flags(folder / f"{n}.yaml", overrides, strict=False)) for n in names]
    for key, value in overrides.items():
        if value is not None and not any(hasattr(cfg, key) for _, _, cfg in out):
            raise ConfigError(f"--{key} applies to none of {', '.join(names)}")
    return out


def run_settings(args, task, solvers, dtype):
    """What every output of a run depends on, as JSON values: two runs may share a workdir only if these are equal.
    Left out, as they change no image: metrics, --limit, --batch_size, --device (beyond the dtype), processes."""
    needs_clip = any(getattr(cfg, "use_AN", False) for _, _, cfg in solvers)
    if args.use_dataloader:
        images = {"dataset": args.dataset, "root": str(Path(args.root).resolve()), "target": args.target}
    else:
        images = str(args.img_path.resolve())
    settings = {"prompt": args.prompt, "null_prompt": args.null_prompt, "task": dataclasses.asdict(task),
                "solvers": {name: {"solver": solver, **dataclasses.asdict(cfg)} for name, solver, cfg in solvers},
                "seed": args.seed, "model": args.model, "image_encoder": args.image_encoder if needs_clip else None,
                "dtype": str(dtype).removeprefix("torch."), "images": images}
    return json.loads(json.dumps(settings))  # as read back from a record (tuples as lists)


def claim_workdir(args, settings, methods):
    """ConfigError unless WORKDIR is empty of runs or holds this run's settings only (see the module docstring)."""
    if args.overwrite:
        if args.skip_existing:
            raise ConfigError("--overwrite removes the run that --skip_existing would resume; give one of them")
        return
    name = slug(args.prompt)

    def expected(index):
        return [p.relative_to(args.workdir) for p in output_files(args.workdir, index, name, methods,
                                                                   bool(args.compare)).values()]
    reason = runs.settings_conflict(args.workdir, settings, expected)
    if reason:
        raise ConfigError(f"--workdir {args.workdir} holds another run: {reason}; add --overwrite to replace it, or "
                          "choose another --workdir to keep it")


def check_workdir(path):
    """ConfigError unless `path` is, or can be made, a writable folder. Creates nothing."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise ConfigError(f"--workdir: the name {part[:40]}... is too long for the file system")
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(f"--workdir {path}: {probe} is a symlink to a missing target")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--workdir {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {path}: {probe} is not writable")


def settings_line(name, cfg, flags):
    """'name: field value, ...' with '(--flag)' after each value a CLI flag set."""
    parts = [f"{k} {v}" + (" (--%s)" % k if k in flags else "") for k, v in dataclasses.asdict(cfg).items()]
    return f"{name}: " + ", ".join(parts)


def check_finite(method, steps):
    """A solver callback that stops the run at the first step whose estimate is NaN or inf."""
    def callback(info):
        if not torch.isfinite(info["z0"]).all():
            raise NumericalError(f"{method} produced NaN or inf at step {info['i'] + 1} of {steps}; nothing was "
                                 f"written for this image (a noise_scale or step size far from its default?)")
    return callback


def prepare(args, state):
    """Everything that can be wrong with the input, checked before any model loads or any file is written."""
    device = hub.resolve_device(args.device, state)
    if not 0 <= args.seed <= SEED_MAX:
        raise ConfigError(f"--seed must be in [0, {SEED_MAX}], got {args.seed}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if not 1 <= args.batch_size <= 4096:
        raise ConfigError(f"--batch_size must be in [1, 4096], got {args.batch_size}")
    task = load_task(args.task_config, args.image_size)
    solvers = [(method, solver, with_noise(cfg, task.noise_scale)) for method, solver, cfg in solver_configs(args)]
    metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if "ssim" in metric_names and task.image_size < 11:
        raise ConfigError(f"--metrics ssim needs images of at least 11 pixels (its window), got {task.image_size}")
    try:
        op = build_operator(task.operator, task.image_size, **task.params).to(device)
        metric_fns, notes = build_metrics(metric_names, device=device, clip_model=args.clip_model,
                                          style=args.metrics_style)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    check_workdir(args.workdir)
    paths = input_images(args.img_path, args.use_dataloader, args.dataset, args.root, args.target)[: args.limit]
    if args.seed + len(paths) - 1 > SEED_MAX:
        raise ConfigError(f"--seed {args.seed} + image index overflows the 64-bit generator seed")
    # every image decoded (a truncated file, one that is no image, a decompression bomb fail here, not at image 700)
    checked = [check_image(path, task.image_size) for path in paths]
    load_image(paths[0], task.image_size)
    return device, task, solvers, op, metric_fns, notes, paths, checked


def check_prior(prior, task, solvers, args, device):
    """The checks that need the loaded prior (still before any file is written)."""
    if not getattr(prior, "has_text", True):  # a pixel diffusion model (treg.priors.pixel): unconditional
        if any(getattr(cfg, "use_AN", False) for _, _, cfg in solvers):
            raise ConfigError(f"adaptive negation needs text and '{args.model}' has none; drop --use_AN")
        if any(solver == "p2l" for _, solver, _ in solvers):
            raise ConfigError(f"p2l tunes the prompt and '{args.model}' has no text; choose another solver")
        if args.prompt or any(getattr(cfg, "cfg_guidance", 0) > 0 for _, _, cfg in solvers):
            warnings.warn(f"'{args.model}' is an unconditional pixel model: the prompt and cfg_guidance are ignored")
    multiple = getattr(prior, "size_multiple", prior.vae_scale_factor)
    if task.image_size % multiple:
        raise ConfigError(f"image_size {task.image_size} must be a multiple of {multiple} for this model "
                          f"(e.g. {max(multiple, task.image_size // multiple * multiple)})")
    for name, _, cfg in solvers:
        if getattr(cfg, "steps", 0) > len(prior.alphas_cumprod):
            raise ConfigError(f"{name}: steps {cfg.steps} exceeds the model's {len(prior.alphas_cumprod)} "
                              "training steps")
    need, have = memory_needed(prior, task.image_size, args.batch_size), available_memory(device)
    if need > have:
        raise ConfigError(f"image_size {task.image_size} with batch size {args.batch_size} needs about "
                          f"{need / 2 ** 30:.1f} GiB on {device}, {have / 2 ** 30:.1f} GiB is free; use a smaller "
                          f"--image_size or --batch_size")


def run(args, state, header):
    """Solve every image of this process's shard; `header` is filled with the run's settings first."""
    device, task, solvers, op, metric_fns, notes, paths, checked = prepare(args, state)
    dtype = hub.weight_dtype(args.dtype, device)
    methods = [name for name, _, _ in solvers]
    settings = run_settings(args, task, solvers, dtype)
    claim_workdir(args, settings, methods)
    for note in notes:
        warnings.warn(note)
    if args.compare and state.is_main_process:
        flags = {k for k in SOLVER_FLAGS if getattr(args, k) is not None}
        for name, _, cfg in solvers:
            print(settings_line(name, cfg, flags), file=sys.stderr)

    needs_clip = any(getattr(cfg, "use_AN", False) for _, _, cfg in solvers)
    prior = load_prior(args.model, device, dtype, image_encoder=args.image_encoder if needs_clip else None)
    check_prior(prior, task, solvers, args, device)
    if args.overwrite:  # every check has passed: only now is the old run removed, by one process
        if state.is_main_process:
            removed = runs.clear_outputs(args.workdir)
            if removed:
                print(f"--overwrite: removed {removed} files of the previous run in {args.workdir}", file=sys.stderr)
        state.wait_for_everyone()
    if args.gradient_checkpointing and hasattr(prior, "enable_gradient_checkpointing"):
        prior.enable_gradient_checkpointing()
    profiler = Profiler(device)
    prior_p, op_p = profiler.wrap(prior, PRIOR_PARTS), profiler.wrap(op, OPERATOR_PARTS)
    with torch.no_grad():
        uc, c = prior.embed([args.null_prompt, args.prompt]).chunk(2)

    compare = bool(args.compare)
    header |= {"args": runs.cli_args(args), "settings": settings,
              "task": dataclasses.asdict(task),
              "solvers": {name: {"solver": solver, **dataclasses.asdict(cfg)} for name, solver, cfg in solvers},
              "device": str(device), "dtype": str(dtype).removeprefix("torch."), "versions": versions()}
    name = slug(args.prompt)
    done = {}
    if args.skip_existing:
        done = {r["index"]: r for r in runs.read_records(args.workdir, warn=False)
                if r.get("settings") == settings and r.get("image_sha256")}
    todo = [i for i in range(len(paths))[state.process_index::state.num_processes]
            if not (i in done and done[i]["image_sha256"] == checked[i][1])]
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        x = torch.cat([load_image(paths[i], task.image_size) for i in batch]).to(device)
        # One CPU generator per image: the same y and solver noise on every device, batch size and shard.
        gens = [torch.Generator().manual_seed(args.seed + i) for i in batch]
        y = measure(op, x, task.noise_scale, gens)
        after_y = [g.get_state() for g in gens]
        floor = task.noise_scale * y[0].numel() ** 0.5
        results = [{} for _ in batch]
        outputs = {}
        for method, solver, cfg in solvers:
            for g, s in zip(gens, after_y):
                g.set_state(s)  # every method starts from the same noise
            profiler.reset()
            begin = time.perf_counter()
            label = f"[{batch[0] + 1}/{len(paths)}] {method}"
            steps = getattr(cfg, "steps", None)
            finite = check_finite(method, steps)
            with tqdm(total=steps, desc=label, unit="step", leave=False, file=sys.stderr,
                      disable=not sys.stderr.isatty()) as bar:
                x_hat = SOLVERS[solver][0](prior_p, op_p, y, cfg, c=c, uc=uc, generator=gens,
                                           callback=lambda info: (finite(info), bar.update()))
            if not torch.isfinite(x_hat).all():
                raise NumericalError(f"{method} returned NaN or inf; nothing was written for this image")
            wall = time.perf_counter() - begin
            x_hat = x_hat.clamp(-1, 1)
            outputs[method] = x_hat
            report = profiler.report(wall, len(batch))
            with torch.no_grad():
                residual = residual_norm(op, y, x_hat)
                scores = {k: fn(x_hat, x, [args.prompt] * len(batch)) for k, fn in metric_fns.items()}
            if args.round_trip:
                inversion = InversionConfig(cfg_guidance=getattr(cfg, "cfg_guidance", 1.0),
                                            official_shift=getattr(cfg, "official_shift", True))
                scores["round_trip_psnr"] = round_trip_psnr(prior, x_hat, inversion, c=c, uc=uc, generator=gens)
            for j in range(len(batch)):
                results[j][method] = {"wall_seconds": round(wall / len(batch), 4), "residual": residual[j].item(),
                                      "noise_floor": floor, "metrics": {k: v[j].item() for k, v in scores.items()},
                                      **report}
        with torch.no_grad():
            y_view = viewable(y, task.image_size)
            y_pred = {m: viewable(op.A(v), task.image_size) for m, v in outputs.items()}
        for j, i in enumerate(batch):
            files = output_files(args.workdir, i, name, methods, compare)
            pictures = {("input", None): y_view[j], ("label", None): x[j],
                        **{("recon", m): outputs[m][j] for m in methods},
                        **{("ypred", m): y_pred[m][j] for m in methods}}
            if compare:
                pictures[("compare", None)] = grid([[y_view[j], *(outputs[m][j] for m in methods), x[j]]],
                                                   ["measurement", *methods, "ground truth"])
            size, digest = checked[i]
            record = {"index": i, "path": str(paths[i]), "image_sha256": digest, "prompt": args.prompt,
                      "process": state.process_index, "device": str(device), "original_size": list(size),
                      "settings": settings, "results": results[j],
                      "files": {f"{k}/{m}" if m else k: str(p) for (k, m), p in files.items()}}
            write_outputs(files, pictures, runs.record_path(args.workdir, i), record)
            line = ", ".join(f"{m} residual {r['residual']:.4g}" + "".join(
                f" {k} {v:.4g}" for k, v in r["metrics"].items()) for m, r in results[j].items())
            upsampled = f", upsampled from {size[0]}x{size[1]}" if min(size) < task.image_size else ""
            print(f"[{i + 1}/{len(paths)}] {paths[i].name}: {line} (noise floor {floor:.4g}{upsampled})",
                  file=sys.stderr)


def finish(args, header, state, compare):
    """After every process is done, the main one merges the records into run.json and metrics.csv."""
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    summary = runs.merge(args.workdir, header)
    if summary is None:
        return
    columns = ["residual", "noise_floor", *sorted({k for s in summary.values() for k in s} - {
        "residual", "noise_floor", "wall_seconds", "nfe", "peak_memory_mb", "images"}),
        "wall_seconds", "nfe", "peak_memory_mb", "images"]
    table = runs.markdown_table(summary, columns)
    if compare:
        runs.write_text(args.workdir / "compare.md", table + "\n")
    print(table)


def main(argv=None):
    args = parse_args(argv)
    from accelerate import PartialState
    hub.quiet_libraries()
    # cpu=True lets processes started by `accelerate launch` on a machine without an accelerator (or with
    # --device cpu) form a gloo group instead of running alone
    state = PartialState(cpu=args.device == "cpu" or not torch.accelerator.is_available())
    header = {}
    try:
        run(args, state, header)
        finish(args, header, state, bool(args.compare))
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
