"""GPU check at Stable Diffusion's real size: every solver in fp16 and bf16, the decoder and CG prox precision, and
the UNet step eager and compiled. What it records and the flags are described with its command line, `gpu` in
treg/bench/flags.py (`python -m treg bench gpu --help`); main(argv) is run(flags.gpu(argv)).
"""
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from treg.bench import flags
from treg.config import ROOT

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def machine(device):
    """The machine's name and what the numbers depend on."""
    import diffusers
    import transformers
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
                 "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(),
                 "sdp_backends": {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                                  for k in ("flash", "mem_efficient", "math", "cudnn")
                                  if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")}}
    return info


def sync(device):
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def reset_peak(device):
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)


def peak_mb(device):
    if device.type != "cpu":
        return round(torch.accelerator.max_memory_allocated(device) / 2 ** 20)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # the process's peak RSS so far


class SyncCounter:
    """Counts the host syncs of CUDA work inside the block (torch.cuda.set_sync_debug_mode); None on other
    devices, which have no such mode."""

    def __init__(self, device):
        self.device, self.count, self.where = device, None, {}

    def __enter__(self):
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            syncs = [w for w in self._caught if "synchroniz" in str(w.message)]
            self.count = len(syncs)
            for w in syncs:
                key = f"{Path(w.filename).name}:{w.lineno}"
                self.where[key] = self.where.get(key, 0) + 1
        return False


def solver_config(solver, steps):
    """The solver's YAML config with `steps` (treg with adaptive negation; σ_y = solve.py's task noise 0.01)."""
    from treg.solvers import configure
    return configure(solver, steps, overrides={"use_AN": True} if solver == "treg" else None, noise_scale=0.01)[1]


def run_solver(prior, op, y, solver, steps, c, uc, device):
    """One solve: its status line, finiteness of every step's estimate and of the output, peak memory, seconds per
    step and host syncs. Finiteness is accumulated on the device, so the check adds no sync of its own."""
    from treg.config import ConfigError
    from treg.solvers import SOLVERS
    cfg = solver_config(solver, steps)
    finite = torch.ones((), dtype=torch.bool, device=device)

    def callback(info):
        finite.logical_and_(torch.isfinite(info["z0"]).all())

    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    try:
        with SyncCounter(device) as syncs:
            x = SOLVERS[solver][0](prior, op, y, cfg, c=c, uc=uc, generator=[torch.Generator().manual_seed(1)],
                                   callback=callback)
        sync(device)
    except ConfigError as err:  # a solver that cannot run on this prior says so (ddrm on Stable Diffusion)
        return {"status": f"refused: {str(err).splitlines()[0]}"}
    except Exception as err:  # the point of the check: a dtype or device error is a finding, not a crash
        return {"status": f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"}
    seconds = time.perf_counter() - start
    return {"status": "ok", "steps_finite": bool(finite), "output_finite": bool(torch.isfinite(x).all()),
            "s_per_step": round(seconds / steps, 4), "peak_memory_mb": peak_mb(device), "host_syncs": syncs.count,
            "sync_sites": dict(sorted(syncs.where.items(), key=lambda kv: -kv[1])[:4])}


def precision_checks(prior, op, y, gen, device):
    """The VAE decode in the model dtype against an fp32 copy of the decoder on the same latent, and the dtype
    the CG prox runs in (it takes the decode's output)."""
    import copy

    from treg.linalg import prox
    f = prior.vae_scale_factor
    size = op.At(y).shape[-1]
    z = torch.randn(1, prior.latent_channels, size // f, size // f, generator=gen).to(device)
    with torch.no_grad():
        x = prior.decode(z)
        vae32 = copy.deepcopy(prior.vae).float()
        x32 = vae32.decode(z / prior.scaling).sample
        del vae32
        x0y = prox(op, x, y, 1e-4, 5, 1e-4)
    return {"decode_finite": bool(torch.isfinite(x).all()), "decode_max_abs": round(float(x.abs().max()), 3),
            "decode_max_abs_err_vs_fp32": round(float((x - x32).abs().max()), 4), "cg_prox_dtype": str(x0y.dtype)}


def time_unet(prior, z, c, uc, reps, device, compile_backend=None):
    """Seconds of one CFG noise prediction (batch 2: TReg's and DDIM's per-step UNet call), median of `reps` after
    one warm-up call; with compile_backend, the UNet under torch.compile and the first call's (compile) seconds."""
    from treg.diffusion import guided_eps
    unet = prior.unet
    out = {}
    if compile_backend:
        prior.unet = torch.compile(unet, backend=compile_backend)
    try:
        with torch.no_grad():
            sync(device)
            start = time.perf_counter()
            guided_eps(prior, z, 500, uc, c, 5.0)
            sync(device)
            out["first_call_s"] = round(time.perf_counter() - start, 3)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                guided_eps(prior, z, 500, uc, c, 5.0)
                sync(device)
                times.append(time.perf_counter() - start)
        out["s_per_step"] = round(sorted(times)[len(times) // 2], 4)
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    finally:
        prior.unet = unet
    return out


def check(args, model, device):
    """All parts of the check, within args.budget_s from now; returns the report's data."""
    from treg.priors.analytic import load_image
    from treg.operators import build_operator, measure
    from treg.priors.load import load_prior
    from treg.solvers import SOLVERS
    began = time.monotonic()
    solvers = [s for s in args.solvers.split(",") if s] if args.solvers else list(SOLVERS)
    op = build_operator("super_resolution", args.image_size, scale=16).to(device)
    gen = torch.Generator().manual_seed(0)
    y = measure(op, load_image(ROOT / "samples/cat_1.jpg", args.image_size).to(device), 0.01, gen)
    data = {"solvers": {}, "precision": {}, "unet_step": {}, "skipped": []}
    for name in [d for d in args.dtypes.split(",") if d]:
        prior = load_prior(str(model), device, DTYPES[name], image_encoder="auto")
        with torch.no_grad():
            uc, c = prior.embed(["out of focus, depth of field", "a photo of a cat"]).chunk(2)
        data["precision"][name] = precision_checks(prior, op, y, gen, device)
        for solver in solvers:
            if time.monotonic() - began > args.budget_s:
                data["skipped"].append(f"{solver} {name}")
                continue
            data["solvers"][f"{solver}, {name}"] = run_solver(prior, op, y, solver, args.steps, c, uc, device)
            print(f"{solver} {name}: {data['solvers'][f'{solver}, {name}']}", file=sys.stderr)
        f = prior.vae_scale_factor
        z = torch.randn(1, prior.latent_channels, args.image_size // f, args.image_size // f, generator=gen)
        for backend in [None, *([args.compile_backend] if name in args.compile_dtypes.split(",") else [])]:
            label = f"{name}, " + (f"torch.compile ({backend})" if backend else "eager")
            if time.monotonic() - began > args.budget_s:
                data["skipped"].append(label)
                continue
            data["unet_step"][label] = time_unet(prior, z.to(device), c, uc, args.reps, device, backend)
            print(f"{label}: {data['unet_step'][label]}", file=sys.stderr)
        del prior
        if device.type != "cpu":
            torch.accelerator.empty_cache()
    data["seconds"] = round(time.monotonic() - began, 1)
    return data


def markdown_report(data, args):
    from treg.runs import markdown
    m = data["machine"]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else f"no GPU: {m['cpu']}"
    solver_rows = [[k, v["status"], v.get("steps_finite"), v.get("output_finite"), v.get("s_per_step"),
                    v.get("peak_memory_mb"), v.get("host_syncs")] for k, v in data["solvers"].items()]
    text = (f"Machine: {gpu}, host {m['host']}, torch {m['torch']}, diffusers {m['diffusers']}; model "
            f"{args.model_label}, ×16 SR at {args.image_size}², {args.steps} steps per solver (YAML configs, treg "
            f"with adaptive negation), {data['seconds']} s in all. Peak memory: "
            + ("torch.cuda.max_memory_allocated per solve" if "gpu" in m else "the process's peak RSS so far")
            + "; host_syncs: torch.cuda sync debug mode's count over the solve (none on CPU).\n\n"
            + markdown(["solver, dtype", "status", "steps_finite", "output_finite", "s_per_step", "peak_memory_mb",
                        "host_syncs"], solver_rows)
            + "\n\nVAE decode in the model dtype against the fp32 decoder on the same latent, and the CG prox's "
              "dtype:\n\n"
            + markdown(["dtype", "decode_finite", "decode_max_abs", "decode_max_abs_err_vs_fp32", "cg_prox_dtype"],
                       [[k, *v.values()] for k, v in data["precision"].items()])
            + f"\n\nOne step's CFG UNet call (batch 2), median of {args.reps} after a first call (which compiles):\n\n"
            + markdown(["dtype, mode", "first_call_s", "s_per_step", "error"],
                       [[k, v.get("first_call_s"), v.get("s_per_step"), v.get("error")]
                        for k, v in data["unet_step"].items()])
            + ("\n\nSkipped (over --budget_s): " + ", ".join(data["skipped"]) if data["skipped"] else "")
            + "\n\nHost-sync sites per solver (file:line: count), first four:\n\n"
            + "\n".join(f"- {k}: {v['sync_sites']}" for k, v in data["solvers"].items() if v.get("sync_sites"))
            + "\n")
    return text


def run(args):
    """The benchmark for flags.gpu's arguments: writes the report and prints it."""
    from treg.config import ConfigError
    from treg.hub import quiet_libraries, resolve_device
    from treg.runs import write_report
    unknown = sorted(set(d for d in args.dtypes.split(",") if d) - set(DTYPES))
    if unknown:
        sys.exit(f"error: unknown --dtypes {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    try:
        device = resolve_device(args.device)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if device.type == "cpu" and args.model == "full":
        sys.exit("error: no accelerator here; the CPU smoke form is --device cpu --model tiny --image_size 64")
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if args.model == "full":
            from treg.priors.tiny import build_full_size_sd
            model = build_full_size_sd(Path(tmp) / "sd", device=device, log=lambda line: print(line, file=sys.stderr))
        elif args.model == "tiny":
            from treg.priors.tiny import build_tiny_sd
            model = build_tiny_sd(Path(tmp) / "tiny-sd")
        else:
            model = Path(args.model)
        built = round(time.perf_counter() - start, 1)
        args.model_label = {"full": "random full-size SD-1.5 (treg.priors.tiny --full-size)",
                            "tiny": "tiny random SD"}.get(args.model, args.model)
        data = {"machine": machine(device), "model": args.model_label, "build_s": built, **check(args, model, device),
                "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model_label")}}
    text = markdown_report(data, args)
    write_report(args.out, text, data)
    print(text)


def main(argv=None):
    run(flags.gpu(argv))


if __name__ == "__main__":
    main()
