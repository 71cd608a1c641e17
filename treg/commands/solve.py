"""What one `python solve.py` run does once its flags have parsed (solve.py owns the flags and the exit codes):
check every input, load the prior, then per batch measure → solve with each method → write, in the shape of EDM's
generate.py. The workdir rules are in solve.py's docstring; the file writing is in treg/runs.py."""
import dataclasses
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from treg import hub, runs
from treg.config import ConfigError, check_value, load_solver, load_task
from treg.datasets import input_images
from treg.images import check_image, grid, load_image, viewable
from treg.metrics import build_metrics
from treg.operators import build_operator, measure
from treg.priors.load import load_prior
from treg.profiling import OPERATOR_PARTS, PRIOR_PARTS, Profiler, check_memory
from treg.solvers import SOLVERS, with_noise
from treg.solvers.inversion import InversionConfig, round_trip_psnr
from treg.solvers.latent import residual_norm

# CLI flags that override a field of the solver config when given (None = use the YAML's value)
SOLVER_FLAGS = ("steps", "cfg_guidance", "cg_lamb", "null_lr", "use_AN", "use_DPS", "dps_lamb", "init", "init_t",
                "init_invert_t")
SEED_MAX = 2 ** 63 - 1          # torch.Generator.manual_seed takes a signed 64-bit seed; image i uses seed + i


class NumericalError(RuntimeError):
    """A solver produced NaN or inf; reported as one line naming the method and the step."""


@dataclasses.dataclass
class Job:
    """Everything a run's batches share, built and checked before the first image is solved."""
    args: object
    state: object                 # accelerate's PartialState: this process's shard
    device: torch.device
    task: object                  # treg.config.TaskConfig
    solvers: list                 # [(method, solver name, config)]
    op: object                    # the operator (profiled)
    prior: object                 # the prior (profiled); job.raw_prior unwrapped, for the round-trip diagnostic
    raw_prior: object
    profiler: Profiler
    c: torch.Tensor               # prompt and null-prompt embeddings
    uc: torch.Tensor
    metric_fns: dict
    paths: list                   # every input image of the run; checked[i] = (original size, SHA-256)
    checked: list
    settings: dict                # what the outputs depend on (run_settings)

    @property
    def methods(self):
        return [method for method, _, _ in self.solvers]


def run(args, state, header):
    """Solve every image of this process's shard; `header` is filled with the run's settings first."""
    job = build(args, state, header)
    for batch in todo(job):
        x, y, gens = measure_batch(job, batch)
        after_y = [g.get_state() for g in gens]
        outputs, results = {}, [{} for _ in batch]
        for method, solver, cfg in job.solvers:
            for g, s in zip(gens, after_y):
                g.set_state(s)  # every method starts from the same noise
            outputs[method] = solve_batch(job, batch, method, solver, cfg, x, y, gens, results)
        write_batch(job, batch, x, y, outputs, results)


def build(args, state, header):
    """Check every input, claim the workdir, load the prior and embed the prompts; nothing is written before the
    last check has passed (--overwrite's removal included)."""
    device, task, solvers, op, metric_fns, notes, paths, checked = prepare(args, state)
    dtype = hub.weight_dtype(args.dtype, device)
    settings = run_settings(args, task, solvers, dtype)
    claim_workdir(args, settings, [method for method, _, _ in solvers])
    for note in notes:
        warnings.warn(note)
    if args.compare and state.is_main_process:
        flags = {k for k in SOLVER_FLAGS if getattr(args, k) is not None}
        for name, _, cfg in solvers:
            print(settings_line(name, cfg, flags), file=sys.stderr)

    needs_clip = any(getattr(cfg, "use_AN", False) for _, _, cfg in solvers)
    prior = load_prior(args.model, device, dtype, image_encoder=args.image_encoder if needs_clip else None)
    check_prior(prior, task, solvers, args)
    check_memory(prior, task.image_size, args.batch_size, device)
    if args.overwrite:  # every check has passed: only now is the old run removed, by one process
        if state.is_main_process:
            removed = runs.clear_outputs(args.workdir)
            if removed:
                print(f"--overwrite: removed {removed} files of the previous run in {args.workdir}", file=sys.stderr)
        state.wait_for_everyone()
    if args.gradient_checkpointing and hasattr(prior, "enable_gradient_checkpointing"):
        prior.enable_gradient_checkpointing()
    profiler = Profiler(device)
    with torch.no_grad():
        uc, c = prior.embed([args.null_prompt, args.prompt]).chunk(2)
    header |= {"args": runs.cli_args(args), "settings": settings, "task": dataclasses.asdict(task),
               "solvers": {name: {"solver": solver, **dataclasses.asdict(cfg)} for name, solver, cfg in solvers},
               "device": str(device), "dtype": str(dtype).removeprefix("torch."), "versions": versions()}
    return Job(args, state, device, task, solvers, profiler.wrap(op, OPERATOR_PARTS), profiler.wrap(prior, PRIOR_PARTS),
               prior, profiler, c, uc, metric_fns, paths, checked, settings)


def todo(job):
    """This process's images in batches: every num_processes-th index, less those --skip_existing finds done."""
    args = job.args
    done = {}
    if args.skip_existing:
        done = {r["index"]: r for r in runs.read_records(args.workdir, warn=False)
                if r.get("settings") == job.settings and r.get("image_sha256")}
    mine = range(len(job.paths))[job.state.process_index::job.state.num_processes]
    left = [i for i in mine if not (i in done and done[i]["image_sha256"] == job.checked[i][1])]
    return [left[k:k + args.batch_size] for k in range(0, len(left), args.batch_size)]


def measure_batch(job, batch):
    """x, y = A(x) + noise, and one CPU generator per image seeded seed + index: the same y and solver noise on
    every device, batch size and shard."""
    x = torch.cat([load_image(job.paths[i], job.task.image_size) for i in batch]).to(job.device)
    gens = [torch.Generator().manual_seed(job.args.seed + i) for i in batch]
    y = measure(job.op, x, job.task.noise_scale, gens)
    return x, y, gens


def solve_batch(job, batch, method, solver, cfg, x, y, gens, results):
    """One method on one batch (indices `batch`), with a progress bar; its timings, residual and metrics go into
    results[j][method]. Returns the clamped solution."""
    args, n = job.args, len(batch)
    job.profiler.reset()
    begin = time.perf_counter()
    steps = getattr(cfg, "steps", None)
    finite = check_finite(method, steps)
    with tqdm(total=steps, desc=f"[{batch[0] + 1}/{len(job.paths)}] {method}", unit="step", leave=False,
              file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        x_hat = SOLVERS[solver][0](job.prior, job.op, y, cfg, c=job.c, uc=job.uc, generator=gens,
                                   callback=lambda info: (finite(info), bar.update()))
    if not torch.isfinite(x_hat).all():
        raise NumericalError(f"{method} returned NaN or inf; nothing was written for this image")
    wall = time.perf_counter() - begin
    x_hat = x_hat.clamp(-1, 1)
    report = job.profiler.report(wall, n)
    with torch.no_grad():
        residual = residual_norm(job.op, y, x_hat)
        scores = {k: fn(x_hat, x, [args.prompt] * n) for k, fn in job.metric_fns.items()}
    if args.round_trip:
        inversion = InversionConfig(cfg_guidance=getattr(cfg, "cfg_guidance", 1.0),
                                    official_shift=getattr(cfg, "official_shift", True))
        scores["round_trip_psnr"] = round_trip_psnr(job.raw_prior, x_hat, inversion, c=job.c, uc=job.uc,
                                                    generator=gens)
    floor = job.task.noise_scale * y[0].numel() ** 0.5
    for j in range(n):
        results[j][method] = {"wall_seconds": round(wall / n, 4), "residual": residual[j].item(),
                              "noise_floor": floor, "metrics": {k: v[j].item() for k, v in scores.items()}, **report}
    return x_hat


def write_batch(job, batch, x, y, outputs, results):
    """Each image's PNGs and record (complete or absent: runs.write_outputs), and one line on stderr."""
    args, task, methods, compare = job.args, job.task, job.methods, bool(job.args.compare)
    with torch.no_grad():
        y_view = viewable(y, task.image_size)
        y_pred = {m: viewable(job.op.A(v), task.image_size) for m, v in outputs.items()}
    name = runs.slug(args.prompt)
    floor = results[0][methods[0]]["noise_floor"]  # solve_batch's, the same for every image and method
    for j, i in enumerate(batch):
        files = runs.output_files(args.workdir, i, name, methods, compare)
        pictures = {("input", None): y_view[j], ("label", None): x[j],
                    **{("recon", m): outputs[m][j] for m in methods},
                    **{("ypred", m): y_pred[m][j] for m in methods}}
        if compare:
            pictures[("compare", None)] = grid([[y_view[j], *(outputs[m][j] for m in methods), x[j]]],
                                               ["measurement", *methods, "ground truth"])
        size, digest = job.checked[i]
        record = {"index": i, "path": str(job.paths[i]), "image_sha256": digest, "prompt": args.prompt,
                  "process": job.state.process_index, "device": str(job.device), "original_size": list(size),
                  "settings": job.settings, "results": results[j],
                  "files": {f"{k}/{m}" if m else k: str(p) for (k, m), p in files.items()}}
        runs.write_outputs(files, pictures, runs.record_path(args.workdir, i), record)
        line = ", ".join(f"{m} residual {r['residual']:.4g}" + "".join(
            f" {k} {v:.4g}" for k, v in r["metrics"].items()) for m, r in results[j].items())
        upsampled = f", upsampled from {size[0]}x{size[1]}" if min(size) < task.image_size else ""
        print(f"[{i + 1}/{len(job.paths)}] {job.paths[i].name}: {line} (noise floor {floor:.4g}{upsampled})",
              file=sys.stderr)


def finish(args, header, state):
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
    if args.compare:
        runs.write_text(args.workdir / "compare.md", table + "\n")
    print(table)


# ---------------------------------------------------------------- the checks, before any model loads
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
    runs.check_workdir(args.workdir)
    paths = input_images(args.img_path, args.use_dataloader, args.dataset, args.root, args.target)[: args.limit]
    if args.seed + len(paths) - 1 > SEED_MAX:
        raise ConfigError(f"--seed {args.seed} + image index overflows the 64-bit generator seed")
    # every image decoded (a truncated file, one that is no image, a decompression bomb fail here, not at image 700)
    checked = [check_image(path, task.image_size) for path in paths]
    load_image(paths[0], task.image_size)
    return device, task, solvers, op, metric_fns, notes, paths, checked


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
    """ConfigError unless WORKDIR is empty of runs or holds this run's settings only (see solve.py's docstring)."""
    if args.overwrite:
        if args.skip_existing:
            raise ConfigError("--overwrite removes the run that --skip_existing would resume; give one of them")
        return
    name = runs.slug(args.prompt)

    def expected(index):
        return [p.relative_to(args.workdir) for p in runs.output_files(args.workdir, index, name, methods,
                                                                        bool(args.compare)).values()]
    reason = runs.settings_conflict(args.workdir, settings, expected)
    if reason:
        raise ConfigError(f"--workdir {args.workdir} holds another run: {reason}; add --overwrite to replace it, or "
                          "choose another --workdir to keep it")


def check_prior(prior, task, solvers, args):
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


def versions():
    import diffusers
    import numpy
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}
