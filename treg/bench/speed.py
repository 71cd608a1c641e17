"""Speed and memory benchmark: wall time per image and its breakdown, NFE and peak memory for every solver, each
configuration in its own solve.py process. The modes and the flags are described with its command line, `speed` in
treg/bench/flags.py (`python -m treg bench speed --help`); main(argv) is run(flags.speed(argv)).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from treg.bench import flags
from treg.config import ROOT, ConfigError
from treg.operators import build_operator
from treg.runs import markdown, markdown_table, write_report



def solve(args, folder, solver, extra=(), batch=1, steps=None):
    """Run solve.py on 2·batch copies of the cat and return the last image's result: the first batch pays the
    one-off warm-up (allocator, oneDNN kernel selection) that a long run amortises. `steps` = "yaml" keeps the
    solver YAML's own step count; None uses --steps."""
    cfg = yaml.safe_load((ROOT / f"configs/solver/{solver}.yaml").read_text())
    cfg["steps"] = cfg["steps"] if steps == "yaml" else args.steps
    cfg_path = folder / f"{solver}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    images = folder / f"images{batch}"
    images.mkdir(exist_ok=True)
    for k in range(2 * batch):
        (images / f"cat{k}.jpg").write_bytes((ROOT / "samples/cat_1.jpg").read_bytes())
    workdir = folder / f"run-{solver}-{len(extra)}-{batch}-{steps}"
    cmd = [sys.executable, str(ROOT / "solve.py"), "--model", args.model, "--task_config",
           str(ROOT / "configs/task/super-resolution.yaml"), "--image_size", str(args.image_size),
           "--img_path", str(images), "--solver_config", str(cfg_path), "--prompt", "a photo of a cat",
           "--null_prompt", "out of focus, depth of field", "--cfg_guidance", "5.0", "--workdir", str(workdir),
           "--batch_size", str(batch), "--metrics", "psnr", *(["--device", args.device] if args.device else []),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]  # killed: no stderr
        raise SystemExit(f"error: {solver} failed: {last}")
    record = json.loads((workdir / "run.json").read_text())
    return record["images"][-1]["results"][solver]


COLUMNS = {  # table column: the profiler labels it sums
    "unet_s": ("unet",), "unet_bwd_s": ("unet_backward",), "decode_s": ("vae_decode",),
    "decode_bwd_s": ("vae_decode_backward",), "encode_s": ("vae_encode", "vae_encode_backward"),
    "clip_s": ("clip_image", "text_encoder"), "operator_s": ("operator", "operator_backward"), "other_s": ("other",)}


def breakdown(result):
    """A flat row of one solve: wall time, its breakdown (backward passes through a model count as model time),
    the share outside the models, NFE and peak memory."""
    wall, seconds = result["wall_seconds"], result["seconds"]
    row = {"wall_s": wall, **{col: sum(seconds.get(k, 0.0) for k in labels) for col, labels in COLUMNS.items()}}
    row["outside_models_%"] = 100 * (row["operator_s"] + row["other_s"]) / wall
    return {**row, "nfe": result["nfe"], "peak_memory_mb": result["peak_memory_mb"]}


def blur_speed(size=512, kernel_size=61, repeats=3):
    """Seconds per application of the FFT blur and of a direct depthwise conv2d with the same kernel."""
    op = build_operator("blur", size, kernel="gaussian", kernel_size=kernel_size, std=5.0)
    x = torch.randn(1, 3, size, size)
    weight = op.kernel.flip(-1, -2).expand(3, 1, -1, -1).to(x)

    fft = best_of(lambda: op.A(x), repeats)
    direct = best_of(lambda: F.conv2d(x, weight, padding=kernel_size // 2, groups=3), repeats)
    return {"fft_s": fft, "conv2d_s": direct, "speedup": direct / fft}


def load():
    """The 1-minute load average (the machine may be shared: every timing is reported beside it)."""
    return round(os.getloadavg()[0], 1)


def model_free_parts(size, repeats=3):
    """Seconds of TReg's CG prox (5 iterations, ×16 SR) and of adaptive negation's 10 Adam steps on a (1, 77, 768)
    null embedding: the parts of a TReg step that call no model (the CLIP features are timed with the models)."""
    from treg.linalg import prox
    from treg.solvers.latent import adaptive_negation

    class Features:  # the CLIP image features are timed with the models; here only the Adam loop counts
        @staticmethod
        def image_features(x):
            return torch.ones(len(x), 768)

    gen = torch.Generator().manual_seed(0)
    op = build_operator("super_resolution", size, scale=16)
    x0 = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    y, uc = op.A(x0), torch.randn(1, 77, 768, generator=gen)
    before = load()
    return {"cg_prox_s": best_of(lambda: prox(op, x0, y, 1e-4, 5, 1e-4), repeats),
            "adaptive_negation_adam_s": best_of(lambda: adaptive_negation(Features, x0, uc, 8e-4, 10), repeats),
            "load": f"{before}→{load()}"}


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_reset():
    """Reset the process's peak RSS (Linux: VmHWM := VmRSS); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource_peak_mb()


def resource_peak_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_parts(prior, size, gen):
    """{part: fn} of one call of each model at `size`² on one image: forward without gradient, and forward plus
    the backward of a scalar through it (the VJP a gradient solver takes)."""
    from treg.diffusion import guided_eps, tweedie
    f = prior.vae_scale_factor
    z = torch.randn(1, prior.latent_channels, size // f, size // f, generator=gen).to(prior.device)
    x = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(prior.device)
    with torch.no_grad():
        uc, c = prior.embed(["out of focus, depth of field", "a photo of a cat"]).chunk(2)
    t, a = 500, float(prior.alphas_cumprod[500])

    def backward(fn, inp):
        with torch.enable_grad():
            inp = inp.detach().requires_grad_()
            torch.autograd.grad(fn(inp).square().sum(), inp)

    return {
        "unet_b1": lambda: prior.eps(z, t, c),
        "unet_b2_cfg": lambda: guided_eps(prior, z, t, uc, c, 5.0),
        "unet_fwd_bwd_b1": lambda: backward(lambda z_: tweedie(z_, prior.eps(z_, t, c), a), z),
        "vae_decode": lambda: prior.decode(z),
        "vae_decode_fwd_bwd": lambda: backward(prior.decode, z),
        "vae_encode": lambda: prior.encode(x, gen),
        "vae_encode_fwd_bwd": lambda: backward(lambda x_: prior.encode(x_, gen), x),
        "clip_image": lambda: prior.image_features(x),
        "text_encoder": lambda: prior.embed(["a photo of a cat"]),
    }


def compose(parts, counted, schedule_steps):
    """Seconds per image of one solver's schedule from the parts' seconds per call (`parts`, measured at full size)
    and the call counts of the same schedule on the tiny model (`counted`, a Profiler report): UNet forwards split
    into batch-1 and CFG batch-2 calls by the latents they saw, backward passes at the mean batch of the forwards,
    plus `counted`'s seconds outside the models per step (operator and other) × the steps. Returns (total, outside
    seconds) or None where a part it needs was not measured."""
    calls, latents = counted["calls"], counted["nfe"]
    need = {"unet": ("unet_b1", "unet_b2_cfg"), "unet_backward": ("unet_b1", "unet_fwd_bwd_b1"),
            "vae_decode": ("vae_decode",), "vae_decode_backward": ("vae_decode", "vae_decode_fwd_bwd"),
            "vae_encode": ("vae_encode",), "vae_encode_backward": ("vae_encode", "vae_encode_fwd_bwd"),
            "clip_image": ("clip_image",)}
    if any(calls.get(label) and any(p not in parts for p in ps) for label, ps in need.items()):
        return None
    get = lambda k: parts.get(k, 0.0)
    unet_calls = calls.get("unet", 0)
    b2 = max(latents - unet_calls, 0)  # each CFG call sees two latents
    mean_batch = latents / unet_calls if unet_calls else 1
    total = ((unet_calls - b2) * get("unet_b1") + b2 * get("unet_b2_cfg")
             + calls.get("unet_backward", 0) * mean_batch * (get("unet_fwd_bwd_b1") - get("unet_b1"))
             + calls.get("vae_decode", 0) * get("vae_decode")
             + calls.get("vae_decode_backward", 0) * (get("vae_decode_fwd_bwd") - get("vae_decode"))
             + calls.get("vae_encode", 0) * get("vae_encode")
             + calls.get("vae_encode_backward", 0) * (get("vae_encode_fwd_bwd") - get("vae_encode"))
             + calls.get("clip_image", 0) * get("clip_image"))
    outside = counted["seconds_outside_per_step"] * schedule_steps
    return total + outside, outside


def profile_tiny(solver, steps, size, folder, repeats=1):
    """A Profiler report of `solver` (its YAML config, `steps` steps, treg with adaptive negation) on the tiny model
    at `size`², ×16 SR of the cat, plus its seconds outside the models per step."""
    from treg.priors.analytic import load_image
    from treg.operators import measure
    from treg.priors.load import load_prior
    from treg.profiling import OPERATOR_PARTS, PRIOR_PARTS, Profiler
    from treg.solvers import configure
    from treg.priors.tiny import build_tiny_sd
    tiny = folder / "tiny-sd"
    if not tiny.exists():
        build_tiny_sd(tiny)
    prior = load_prior(str(tiny), "cpu", torch.float32, image_encoder="auto")
    op = build_operator("super_resolution", size, scale=16)
    gen = torch.Generator().manual_seed(0)
    y = measure(op, load_image(ROOT / "samples/cat_1.jpg", size), 0.01, gen)
    fn, cfg = configure(solver, steps, overrides={"use_AN": True} if solver == "treg" else None,
                        noise_scale=0.01)  # solve.py's task noise
    profiler = Profiler("cpu")
    prior_p, op_p = profiler.wrap(prior, PRIOR_PARTS), profiler.wrap(op, OPERATOR_PARTS)
    with torch.no_grad():
        uc, c = prior.embed(["out of focus, depth of field", "a photo of a cat"]).chunk(2)
    profiler.reset()
    start = time.perf_counter()
    fn(prior_p, op_p, y, cfg, c=c, uc=uc, generator=[torch.Generator().manual_seed(1)])
    report = profiler.report(time.perf_counter() - start, 1)
    seconds = report["seconds"]
    report["seconds_outside_per_step"] = (seconds.get("operator", 0) + seconds.get("operator_backward", 0)
                                          + seconds.get("other", 0)) / steps
    return report


def count_calls(solver, schedule_steps, size, folder):
    """The Profiler's call counts (and NFE) of `solver`'s schedule on the tiny model: counted directly up to 6
    steps; for longer schedules the counts of 3 and 6 steps extrapolated linearly (one-off calls plus a per-step
    rate), since a 200-step count costs minutes on a loaded CPU. TReg's data-consistency steps then count at their
    3-step rate, 1 in 3, where its 200-step schedule has 57 (dc_until stops them at 85%)."""
    if schedule_steps <= 6:
        return profile_tiny(solver, schedule_steps, size, folder)
    three, six = profile_tiny(solver, 3, size, folder), profile_tiny(solver, 6, size, folder)
    per_step = lambda a, b: a + (schedule_steps - 3) * (b - a) / 3
    labels = set(three["calls"]) | set(six["calls"])
    return {"calls": {k: per_step(three["calls"].get(k, 0), six["calls"].get(k, 0)) for k in labels},
            "nfe": per_step(three["nfe"], six["nfe"])}


def components(args):
    """The real-size report from the parts: each model call measured once at --image_size on the model of --model
    (seconds and peak RSS), and each solver's time per image composed from them (see compose)."""
    from treg.priors.load import load_prior
    device = torch.device(args.device or "cpu")
    prior = load_prior(args.model, device, torch.float32, image_encoder="auto")
    gen = torch.Generator().manual_seed(0)
    fns = model_parts(prior, args.image_size, gen)
    wanted = [p for p in args.parts.split(",") if p] if args.parts else list(fns)
    unknown = sorted(set(wanted) - set(fns))
    if unknown:
        raise SystemExit(f"error: unknown --parts {', '.join(unknown)}; choose from {', '.join(fns)}")
    resets = peak_rss_reset()
    weights = peak_rss_mb()
    rows = {}
    for checkpointing in (False, True) if args.checkpointing else (False,):
        if checkpointing:
            prior.enable_gradient_checkpointing()
        for part in wanted:
            if checkpointing and "bwd" not in part:
                continue
            name = part + (" + checkpointing" if checkpointing else "")
            peak_rss_reset()
            before, start = load(), time.perf_counter()
            with torch.no_grad():
                fns[part]()
            rows[name] = {"seconds": time.perf_counter() - start, "peak_rss_mb": round(peak_rss_mb()),
                          "load": f"{before}→{load()}"}
            print(f"{name}: {rows[name]}", file=sys.stderr)
    threads = torch.get_num_threads()
    text = (f"model {args.model}, {args.image_size}², fp32 on {device}, {threads} torch threads; each part called "
            "once on one image (no warm-up call), load = the 1-minute load average before→after it (the machine "
            "is shared: seconds grow with the load); peak_rss_mb is the process's peak RSS during the call, the "
            f"fp32 weights included ({weights:.0f} MB before the first call)"
            + ("" if resets else "; this kernel does not reset the peak, so each peak is the run's so far") + "\n\n"
            + markdown(["part", "seconds", "peak_rss_mb", "load"],
                       [[k, v["seconds"], v["peak_rss_mb"], v["load"]] for k, v in rows.items()]) + "\n")
    write_report(args.out, text, {"parts": rows, "settings": {
        "image_size": args.image_size, "device": str(device), "threads": threads, "model": args.model,
        "weights_rss_mb": weights}})
    print(text)


def composed(args, folder):
    """Each solver's time per image at its YAML schedule composed from a --components report (see compose)."""
    from treg.solvers import SOLVERS
    try:
        parts = json.loads(Path(args.compose).read_text())
        measured = {k: v["seconds"] for k, v in parts["parts"].items() if "checkpointing" not in k}
        size = parts["settings"]["image_size"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: --compose {args.compose}: not a --components report ({type(err).__name__})")
    solvers = [s for s in args.solvers.split(",") if s] if args.solvers else list(SOLVERS)
    try:  # the tiny benchmark's seconds outside the models per step, at the same image and latent sizes
        tiny = json.loads(Path(args.outside_from).read_text())
        outside_per_step = {k: (v["operator_s"] + v["other_s"]) / tiny["settings"]["steps"]
                            for k, v in tiny["solvers"].items()} if tiny["settings"]["image_size"] == size else {}
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: --outside_from {args.outside_from}: "
                         f"not a speed-benchmark report ({type(err).__name__})")
    rows, refused = {}, {}
    for solver in solvers:
        schedule_steps = yaml.safe_load((ROOT / f"configs/solver/{solver}.yaml").read_text())["steps"]
        before = load()
        try:
            counted = count_calls(solver, schedule_steps, args.count_size, folder)
        except ConfigError as err:  # ddrm on Stable Diffusion: the decoder is nonlinear
            refused[solver] = str(err).splitlines()[0]
            continue
        outside = outside_per_step.get(solver)
        result = compose(measured, {**counted, "seconds_outside_per_step": outside or 0.0}, schedule_steps)
        if result is None:
            rows[solver] = {"schedule_steps": schedule_steps, "note": "a part it calls was not measured"}
            continue
        total, out = result
        rows[solver] = {"schedule_steps": schedule_steps, "nfe": counted["nfe"], "s_per_step": total / schedule_steps,
                        "s_per_image": total, "outside_models_%": None if outside is None else 100 * out / total,
                        "outside_s_per_step": outside, "load": f"{before}→{load()}"}
        print(f"{solver}: {rows[solver]}", file=sys.stderr)
    free = model_free_parts(size)
    text = (f"Each solver at its YAML schedule (cfg_guidance as in its YAML, treg with adaptive negation), "
            f"COMPOSED, NOT RUN (an extrapolation): the seconds per call of the parts in {args.compose} "
            f"(model {parts['settings']['model']}, {size}², {parts['settings']['threads']} threads) × the calls "
            f"its schedule makes (counted on the tiny model at {args.count_size}²), UNet backward passes at the "
            "mean batch of its forwards, plus the seconds outside the models (operator, CG, Adam, latent "
            f"arithmetic) per step from {args.outside_from} (the tiny model at {size}², the same image and latent "
            "sizes; – where it has no such row: then the time is the models' alone) × the steps; load = the "
            "1-minute load average before→after counting. outside_models_% is that outside share of the composed "
            "time: the distance to the model-call floor.\n\n"
            + markdown_table(rows, ["schedule_steps", "nfe", "s_per_step", "s_per_image", "outside_models_%",
                                    "outside_s_per_step", "load"])
            + "".join(f"\n\n{solver} does not run on Stable Diffusion: {why}" for solver, why in refused.items())
            + f"\n\nTReg's parts that call no model, at {size}² (best of 3, load {free.pop('load')}): "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in free.items()) + "\n")
    write_report(args.out, text, {"composed": rows, "refused": refused, "parts_s": measured, "model_free_s": free,
                                  "settings": {"parts": str(args.compose), "image_size": size,
                                               "count_size": args.count_size, "outside_from": str(args.outside_from),
                                               "threads": torch.get_num_threads()}})
    print(text)


def run(args):
    """The benchmark for flags.speed's arguments: writes the report and prints the tables."""
    if args.compose:
        with tempfile.TemporaryDirectory() as tmp:
            composed(args, Path(tmp))
        return
    if args.components:
        if args.model == "tiny":
            raise SystemExit("error: --components needs --model: a full-size folder (python -m treg tiny "
                             "--full-size DIR) or an SD model")
        components(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.model == "tiny":
            from treg.priors.tiny import build_tiny_sd
            args.model = str(build_tiny_sd(folder / "tiny-sd"))
        solvers = [s for s in args.solvers.split(",") if s]
        per_solver = {}
        for solver in solvers:
            extra = ["--use_AN"] if solver == "treg" else []
            per_solver[solver] = breakdown(solve(args, folder, solver, extra))
            print(f"{solver}: {per_solver[solver]['wall_s']:.2f} s", file=sys.stderr)
        checkpointing = {}
        for solver in [s for s in ("dps",) if s in solvers]:
            checkpointing[f"{solver}"] = per_solver[solver]
            checkpointing[f"{solver} + gradient checkpointing"] = breakdown(
                solve(args, folder, solver, ["--gradient_checkpointing"]))
        batching = {f"treg, batch {b}": breakdown(solve(args, folder, "treg", batch=b)) for b in (1, 4)}
        fast, refused = {}, {}
        for solver in [s for s in args.fast.split(",") if s]:
            steps = yaml.safe_load((ROOT / f"configs/solver/{solver}.yaml").read_text())["steps"]
            try:
                fast[f"{solver}, {steps} steps"] = breakdown(solve(args, folder, solver, steps="yaml"))
            except SystemExit as err:  # e.g. ddrm on Stable Diffusion: its one-line error goes in the report
                refused[solver] = str(err.code).rsplit("error: ", 1)[-1]
    blur = blur_speed(args.image_size)
    columns = ["wall_s", *COLUMNS, "outside_models_%", "nfe", "peak_memory_mb"]
    text = (f"model {args.model if not args.model.endswith('tiny-sd') else 'tiny'}, ×16 SR at {args.image_size}², "
            f"{args.steps} steps, every solver at --cfg_guidance 5.0 (treg with --use_AN), device "
            f"{args.device or 'default'}; seconds are per image, *_bwd_s the backward passes through that model, "
            "outside_models_% = (operator_s + other_s)/wall_s\n\n"
            + markdown_table(per_solver, columns)
            + "\n\nGradient checkpointing (peak memory is the process's peak RSS on CPU):\n\n"
            + markdown_table(checkpointing, ["wall_s", "peak_memory_mb"])
            + "\n\nBatching (wall_s is per image):\n\n" + markdown_table(batching, ["wall_s", "peak_memory_mb"])
            + "\n\nAt each solver's own (YAML) step count:\n\n"
            + markdown_table(fast, ["wall_s", "unet_s", "unet_bwd_s", "nfe", "peak_memory_mb"])
            + "".join(f"\n\n{solver} does not run here: {why}" for solver, why in refused.items())
            + f"\n\nBlur 61×61 at {args.image_size}²: FFT {blur['fft_s'] * 1e3:.1f} ms, direct conv2d "
              f"{blur['conv2d_s'] * 1e3:.0f} ms ({blur['speedup']:.0f}× faster)\n")
    write_report(args.out, text, {
        "solvers": per_solver, "checkpointing": checkpointing, "batching": batching, "blur": blur, "fast": fast,
        "refused": refused, "settings": {"steps": args.steps, "image_size": args.image_size, "device": args.device}})
    print(text)


def main(argv=None):
    run(flags.speed(argv))


if __name__ == "__main__":
    main()
