"""Speed and memory benchmark: wall time per image and its breakdown (UNet, VAE decode/encode, CLIP image encoder,
operator, everything else), NFE and peak memory for every solver, plus the blur, gradient-checkpointing and batch
comparisons. Each configuration runs `solve.py` in its own process so that peak memory is its own.

    python -m treg.bench_speed                      # tiny random SD built offline, 512², 50 steps
    python -m treg.bench_speed --model PATH_OR_ID --steps 200 --device cuda

Writes OUT.md and OUT.json (default assets/speed) and prints the tables.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from treg.operators import build_operator
from treg.runs import markdown_table, write_report

ROOT = Path(__file__).resolve().parent.parent


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
        raise SystemExit(f"error: {solver} failed: {done.stderr.strip().splitlines()[-1]}")
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

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    fft = best(lambda: op.A(x))
    direct = best(lambda: F.conv2d(x, weight, padding=kernel_size // 2, groups=3))
    return {"fft_s": fft, "conv2d_s": direct, "speedup": direct / fft}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (built offline), 'analytic', a hub id or a folder")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per solve (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=512, help="(default: %(default)s)")
    p.add_argument("--device", help="torch device (default: as solve.py)")
    p.add_argument("--solvers", default="ddim,treg,dps,psld,p2l,reddiff", help="(default: %(default)s)")
    p.add_argument("--fast", default="cci,pigdm,ddrm,treg", help="solvers also timed at their YAML step counts "
                   "(the few-step solvers against TReg's 200; a solver the model cannot run is listed as an error) "
                   "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "assets/speed", help="output prefix (default: %(default)s)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.model == "tiny":
            from treg.tiny import build_tiny_sd
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


if __name__ == "__main__":
    main()
