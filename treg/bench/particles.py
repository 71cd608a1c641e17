"""A particle sampler's convergence (tds or tds-svd, treg.solvers.particles) on the calibration bed as the particle
count N grows. Its command
line and description are `particles` in treg/bench/flags.py (`python -m treg bench particles --help`);
main(argv) is run(flags.particles(argv))."""
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from treg.bench import beds as cal
from treg.bench import flags
from treg.bench.calibration import GUIDED, Experiment, ci, solver_config
from treg.config import ROOT, ConfigError
from treg.images import atomic_write
from treg.profiling import PRIOR_PARTS, Profiler
from treg.runs import cli_args, write_report
from treg.solvers import SOLVERS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

PANELS = [("tv", "TV to the posterior weights"), ("spread_measured", "spread ratio, measured"),
          ("spread_null", "spread ratio, null space"), ("residual", "residual / noise floor"),
          ("residual_w1", "residual W1 to the exact"), ("ess", "final ESS / N")]


def solve_cell(bed, solver, cfg, prompt, seeds, chunk):
    """The particle sampler `solver` on the bed's y once per seed, in batches of about `chunk` particles: latents
    (n, 4, 8, 8), NFE per seed, seconds per seed, and per seed the final ESS and the number of resampling steps (from
    the callback)."""
    uc, c = bed.prior.embed(["", prompt]).chunk(2)
    per_call = max(1, chunk // cfg.particles)
    z, ess, resamples, nfe, wall = [], [], [], 0, 0.0
    for start in range(0, len(seeds), per_call):
        part = seeds[start:start + per_call]
        profiler, seen = Profiler("cpu"), []
        begin = time.perf_counter()
        x = SOLVERS[solver][0](profiler.wrap(bed.prior, PRIOR_PARTS), bed.op, bed.y.expand(len(part), -1, -1, -1),
                               cfg, c=c, uc=uc, generator=[torch.Generator().manual_seed(1000 + s) for s in part],
                               callback=seen.append)
        wall += time.perf_counter() - begin
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite solution")
        nfe = profiler.report(0.0, len(part))["nfe"]
        z.append(bed.prior.encode(x.double()))
        ess.append(seen[-1]["ess"])
        resamples.append(seen[-1]["resamples"])
    return torch.cat(z), nfe, wall / len(seeds), torch.cat(ess).numpy(), torch.cat(resamples).numpy()


def experiments(args, bar):
    bed = cal.build_bed(ROOT, args.seed)
    ex = Experiment(bed, list(range(args.seed, args.seed + args.seeds)))
    rows = []
    for w in args.guidance:
        prompt = "" if w == 0 else GUIDED
        exact = w in (0, 1)
        log_w, reference = ex.target(prompt, w)
        law = None if exact else ex.law(prompt, w)[0]
        rows.append({"w": w, "prompt": prompt, "particles": 0, **ex.exact_row(prompt, w)})
        for n in args.particles:
            bar.set_description(f"w={w:g} N={n}")
            seeds = ex.seeds[:max(2, min(args.seeds, args.particle_budget // n))]
            cfg = dataclasses.replace(solver_config(args.solver, args.steps, w, args.set), particles=n)
            z, nfe, seconds, ess, resamples = solve_cell(bed, args.solver, cfg, prompt, seeds, args.chunk)
            fns, runs = cal.statistics(bed, z, log_w, reference, law)
            stats = cal.intervals(fns, len(seeds))
            stats["ess"] = cal.interval(lambda i: ess[i].mean(-1) / n, len(seeds))
            stats["resamples"] = cal.interval(lambda i: resamples[i].mean(-1), len(seeds))
            rows.append({"w": w, "prompt": prompt, "particles": n, "solver": args.solver, "seeds": len(seeds),
                         "nfe": nfe, "seconds": seconds, "stats": stats, "runs": runs | {"ess": ess.round(3).tolist()},
                         "target": "exact posterior" if exact else "none (tilted posterior and CFG law reported)",
                         "law": None if law is None else law.tolist()})
            bar.update()
    return bed, rows


def markdown(bed, rows, args, seconds):
    cfg = solver_config(args.solver, args.steps, 0.0, args.set)
    lines = [
        f"# {args.solver} convergence on the calibration bed", "",
        f"`python -m treg bench particles {shlex.join(args.argv)}`".replace(" `", "`") + f": {args.steps} DDPM steps, "
        f"seeds per cell min({args.seeds}, {args.particle_budget}/N), {seconds / 60:.1f} min on {args.threads} CPU "
        f"thread(s). Every value is the statistic over the seeds (one returned particle each) with its 95 % bootstrap "
        f"interval ({cal.BOOTSTRAP} resamples). {args.solver} settings: configs/solver/{args.solver}.yaml "
        f"(τ² = {cfg.tausq}, resampling "
        f"{cfg.resampling} below ESS {cfg.resample_threshold:g}·N, σ_y = {bed.sigma:g}) with `particles`, `steps`, "
        "`cfg_guidance` set here. ESS: the final weights' effective sample size over N, mean over seeds; resamples: "
        "resampling steps per seed. See `--help`.", ""]
    for w in args.guidance:
        mine = [r for r in rows if r["w"] == w]
        exact = w in (0, 1)
        target = "/".join(f"{v:.3f}" for v in mine[0]["runs"]["target"])
        head = (f"## w = {w:g}, prompt \"{mine[0]['prompt']}\": target the exact posterior ({target})" if exact else
                f"## w = {w:g}, prompt \"{mine[0]['prompt']}\": no exact target (tilted weights {target}, CFG law "
                f"{'/'.join(f'{v:.3f}' for v in mine[1]['law'])})")
        lines += [head, "", "| N | seeds | NFE | TV | " + ("" if exact else "TV CFG | ")
                  + "spread meas. | spread null | residual | residual W1 | final ESS / N | resamples | s / seed |",
                  "|---" * (12 if exact else 13) + "|"]
        for r in mine:
            s = r["stats"]
            cells = [str(r["particles"]) if r["particles"] else "exact", str(len(r["runs"]["landed"])),
                     str(r["nfe"]), ci(s["tv"])] + ([] if exact else [ci(s["tv_cfg"]) if "tv_cfg" in s else ""]) + [
                ci(s["spread_measured"]), ci(s["spread_null"]), ci(s["residual"]), ci(s["residual_w1"])]
            cells += ([ci(s["ess"], 3), ci(s["resamples"], 1), f"{r['seconds']:.2f}"] if r["particles"] else
                      ["", "", ""])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(rows, args, path):
    """Each statistic against N (log axis), one line per w with its 95 % interval, the exact value dashed."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for w in args.guidance:
            mine = [r for r in rows if r["w"] == w and r["particles"]]
            n = [r["particles"] for r in mine]
            v = [r["stats"][key] for r in mine]
            bars = [[max(x[0] - x[1], 0) for x in v], [max(x[2] - x[0], 0) for x in v]]
            ax.errorbar(n, [x[0] for x in v], yerr=bars, marker="o", ms=3, capsize=2, label=f"w = {w:g}")
            exact = next(r for r in rows if r["w"] == w and not r["particles"])
            if key in exact["stats"]:
                ax.axhline(exact["stats"][key][0], ls="--", lw=0.8, color=ax.lines[-1].get_color())
        if key.startswith("spread") or key == "residual":
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("particles N")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="center right", fontsize=9)
    fig.suptitle(f"{args.solver} on the exact bed vs particle count ({args.steps} steps; bars: 95 % bootstrap CI; "
                 "dashed: exact posterior draws)")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def check(args):
    if not args.particles or min(args.particles) < 1:
        raise ConfigError("--particles must be positive integers")
    if args.seeds < 2 or args.particle_budget < 2:
        raise ConfigError("--seeds and --particle_budget must be at least 2 (the spread needs two solutions)")
    if not 1 <= args.steps <= 999:
        raise ConfigError("--steps must be in [1, 999]")
    if not args.guidance or not all(0 <= w <= 100 for w in args.guidance):
        raise ConfigError("--guidance must be in [0, 100]")
    bad = [key for key, _ in args.set if key.split(".", 1)[0] != args.solver]
    if bad:
        raise ConfigError(f"--set {', '.join(bad)}: only {args.solver}.KEY applies")
    solver_config(args.solver, args.steps, 0.0, args.set)  # a broken YAML or --set fails here, before any work


def run(args):
    """The benchmark for flags.particles' arguments: writes the report and its figure, and prints the table."""
    try:
        check(args)
    except (ConfigError, ValueError) as err:
        sys.exit(f"error: {err}")
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    with tqdm(total=len(args.guidance) * len(args.particles), file=sys.stderr, unit="cell") as bar:
        bed, rows = experiments(args, bar)
    seconds = time.perf_counter() - begin
    table = markdown(bed, rows, args, seconds)
    write_report(args.out, table + "\n", {"settings": cli_args(args) | {"seconds": seconds, "task": cal.TASK,
                                                                        "captions": bed.captions}, "rows": rows})
    figure(rows, args, Path(f"{args.out}.png"))
    print(table)



def main(argv=None):
    run(flags.particles(argv))


if __name__ == "__main__":
    main()
