"""Calibration benchmark against an exact multi-modal posterior: does each solver *sample* the posterior (the right
modes, in the right proportions, with the right spread), what does guidance do to that, what happens when the text
contradicts the data, how does it all degrade as NFE falls, and do these numbers catch known-wrong solvers?

The bed (treg/calibration.py): ×8 SR at 64², one measurement y of a cat whose three hidden "details" (striped,
spotted, plain) the measurement cannot see; base weights 0.6/0.3/0.1 on them and a fourth component (rocket) that y
rules out; component width s = 0.1. Every solver of treg.solvers.SOLVERS runs with its configs/solver/<name>.yaml,
only `steps` and `cfg_guidance` set by the experiment, the same for every solver; the null prompt is "" (the zero
embedding, so π_uc is the base weights). Each cell solves the same y with --seeds solver seeds. Experiments:
    calibration   w = 0 at every --steps: landing frequencies vs the exact posterior weights, spread, residuals;
    guidance      prompt "plain" at w ∈ --guidance (--main_steps): landing vs the CFG-tilted target π_uc^(1−w)·π_c^w;
    conflict      prompt "rocket" (ruled out by y) at w = --conflict_w (--main_steps): residual and landing;
    sensitivity   each known-wrong variant of treg.calibration.VARIANTS against its solver, w = 0, at every
                  --sensitivity_steps, same seeds: flagged by each statistic whose paired difference (variant −
                  correct) has a Bonferroni-corrected interval (95 % jointly) excluding 0; a same-maths control
                  must not be flagged.
Statistics, each with a 95 % bootstrap interval over the seeds (1000 resamples):
    tv               ½Σ|landing frequency − target weight| over the 4 components (landed = nearest posterior mean);
    spread meas/null pooled within-component variance of the solutions in the measured / null directions of M,
                     over the exact posterior's: 1 = calibrated, → 0 = collapsed to a point, > 1 = over-dispersed;
    residual         mean ‖y − A x̂‖/(σ√m) (1 = the noise floor);
    residual W1      Wasserstein-1 distance between the solver's residuals and those of 4000 exact posterior draws;
    rel. L2          mean ‖ẑ − m_k‖/‖m_k‖ to the nearest exact posterior mean m_k;
    consistent       fraction landed in a component that y allows (exact posterior weight ≥ 1e-3).
Row `exact` draws --seeds samples from the exact (or tilted) posterior itself: what a perfect sampler scores at this
seed count (TV and W1 are not 0 at finite n). NFE counts noise predictions per image (CFG counts 2).

    python -m treg.bench_calibration     # the full report: 32 min wall with 1 thread on the shared 2-core CPU
                                         # (load 5-6), 16 min of CPU time (504 s user + 459 s system); p2l takes
                                         # 42 % of the wall time, the statistics 5 % (--solvers to choose)
    python -m treg.bench_calibration --solvers treg,dps --seeds 50 --steps 10,50 --out /tmp/cal

Writes OUT.md, OUT.json and OUT.png (NFE curves) (default assets/calibration). Offline: the analytic prior only.
"""
import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

from treg import calibration as cal
from treg.bench_accuracy import parse_set
from treg.config import ConfigError, load_solver, load_task
from treg.images import atomic_write
from treg.profiling import PRIOR_PARTS, Profiler
from treg.fast import with_noise
from treg.runs import cli_args, write_report
from treg.solvers import SOLVERS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

ROOT = Path(__file__).resolve().parent.parent
GUIDED = "plain"      # the guided prompt names the rarest detail, so that guidance visibly moves the weights
REFERENCE_DRAWS = 4000
CURVES = [("tv", "TV to the posterior weights"), ("spread_null", "spread ratio, null space"),
          ("spread_measured", "spread ratio, measured"), ("residual", "residual / noise floor"),
          ("residual_w1", "residual W1 to the exact"), ("rel_l2", "rel. L2 to nearest mean")]


def solver_of(name):
    """The solver function that configs/solver/<name>.yaml names (cci → cci, cci-noiseless → cci)."""
    return SOLVERS[load_solver(ROOT / f"configs/solver/{name}.yaml", SOLVERS)[0]][0]


def solver_config(name, steps, w, sets=()):
    """configs/solver/<name>.yaml with --set's (SOLVER.KEY, value) pairs for it, then `steps` and `cfg_guidance`."""
    overrides = {key.split(".", 1)[1]: value for key, value in sets if key.split(".", 1)[0] == name}
    cfg = load_solver(ROOT / f"configs/solver/{name}.yaml", SOLVERS, overrides)[1]
    fields = {f.name for f in dataclasses.fields(cfg)}
    cfg = with_noise(cfg, load_task(ROOT / f"configs/task/{cal.TASK}.yaml").noise_scale)  # CCI, ΠGDM, DDRM
    return dataclasses.replace(cfg, **{k: v for k, v in (("steps", steps), ("cfg_guidance", w)) if k in fields})


def solve_cell(bed, fn, cfg, prompt, seeds):
    """Solve the bed's y once per seed (one batch): latents (N, 4, 8, 8), NFE per image, seconds per image."""
    profiler = Profiler("cpu")
    n = len(seeds)
    y = bed.y.expand(n, -1, -1, -1)
    uc, c = bed.prior.embed(["", prompt]).chunk(2)
    generators = [torch.Generator().manual_seed(1000 + s) for s in seeds]
    begin = time.perf_counter()
    x = fn(profiler.wrap(bed.prior, PRIOR_PARTS), bed.op, y, cfg, c=c, uc=uc, generator=generators)
    wall = time.perf_counter() - begin
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite solution")
    return bed.prior.encode(x.double()), profiler.report(wall, n)["nfe"], wall / n


class Experiment:
    """Targets and exact reference residuals, cached per (prompt, w)."""

    def __init__(self, bed, seeds):
        self.bed, self.seeds, self.cache = bed, seeds, {}

    def target(self, prompt, w):
        if (prompt, w) not in self.cache:
            log_w = self.bed.tilted_log_weights(prompt, w)
            z, _ = self.bed.exact_draws(log_w, REFERENCE_DRAWS, torch.Generator().manual_seed(1))
            self.cache[prompt, w] = log_w, self.bed.residuals(z).numpy()
        return self.cache[prompt, w]

    def exact_row(self, prompt, w):
        log_w, reference = self.target(prompt, w)
        z, _ = self.bed.exact_draws(log_w, len(self.seeds), torch.Generator().manual_seed(2))
        fns, runs = cal.statistics(self.bed, z, log_w, reference)
        return {"solver": "exact", "nfe": 0, "seconds": 0.0, "stats": cal.intervals(fns, len(z)), "runs": runs}

    def row(self, name, fn, cfg, prompt, w):
        """(row, statistics) of one cell; a failing solver is an `error` row (statistics None), not the end of the
        benchmark."""
        log_w, reference = self.target(prompt, w)
        try:
            z, nfe, seconds = solve_cell(self.bed, fn, cfg, prompt, self.seeds)
        except Exception as err:  # noqa: BLE001
            first = str(err).splitlines()[0][:120] if str(err) else ""
            return {"solver": name, "error": f"{type(err).__name__}: {first}"}, None
        fns, runs = cal.statistics(self.bed, z, log_w, reference)
        return {"solver": name, "nfe": nfe, "seconds": seconds, "stats": cal.intervals(fns, len(z)), "runs": runs}, fns

    def sensitivity(self, label, steps):
        """A known-wrong variant against its solver, both at w = 0 with the same seeds: the paired differences of
        every statistic and the statistics that flag it."""
        base, fn = cal.variant(label)
        cfg = solver_config(base, steps, 0.0)
        correct, correct_fns = self.row(base, SOLVERS[base][0], cfg, "", 0.0)
        wrong, wrong_fns = self.row(label, fn, cfg, "", 0.0)
        row = {"variant": label, "what": cal.VARIANTS[label][1], "solver": base, "steps": steps,
               "correct": correct, "wrong": wrong}
        if correct_fns is None or wrong_fns is None:
            return row
        differences = cal.paired_differences(correct_fns, wrong_fns, len(self.seeds))
        apart = [k for k in differences if correct["stats"][k][2] < wrong["stats"][k][1]
                 or wrong["stats"][k][2] < correct["stats"][k][1]]  # the two cells' own 95 % intervals are disjoint
        return row | {"differences": differences, "flagged_by": cal.flagged(differences), "intervals_disjoint": apart}


def run(args, bar):
    bed = cal.build_bed(ROOT, args.seed)
    ex = Experiment(bed, list(range(args.seed, args.seed + args.seeds)))
    report = {"calibration": [], "guidance": [], "conflict": [], "sensitivity": []}

    def add(section, row, **keys):
        report[section].append({**keys, **row})
        bar.update()

    add("calibration", ex.exact_row("", 0.0), steps="any")  # the same draws at every step count
    for steps in args.steps:
        for name in args.solvers:
            bar.set_description(f"calibration {name} {steps} steps")
            add("calibration", ex.row(name, solver_of(name), solver_config(name, steps, 0.0, args.set), "", 0.0)[0],
                steps=steps)
    for w in args.guidance:
        add("guidance", ex.exact_row(GUIDED, w), w=w)
        for name in args.solvers:
            bar.set_description(f"guidance {name} w={w:g}")
            cfg = solver_config(name, args.main_steps, w, args.set)
            add("guidance", ex.row(name, solver_of(name), cfg, GUIDED, w)[0], w=w)
    add("conflict", ex.exact_row(cal.CONFLICT, args.conflict_w), w=args.conflict_w)
    for name in args.solvers:
        bar.set_description(f"conflict {name}")
        cfg = solver_config(name, args.main_steps, args.conflict_w, args.set)
        add("conflict", ex.row(name, solver_of(name), cfg, cal.CONFLICT, args.conflict_w)[0], w=args.conflict_w)
    for steps in args.sensitivity_steps:
        for label in args.variants:
            bar.set_description(f"sensitivity {label} {steps} steps")
            report["sensitivity"].append(ex.sensitivity(label, steps))
            bar.update()
    return bed, report


def ci(stat, digits=2):
    value, low, high = stat
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(bed, report, args, seconds):
    """The report: settings, then one table per experiment."""
    n = args.seeds
    target0 = bed.tilted_log_weights("", 0.0).exp().tolist()
    lines = [
        "# Calibration against the exact posterior", "",
        f"`python -m treg.bench_calibration {shlex.join(args.argv)}`".replace(" `", "`") + f": {n} seeds per cell, "
        f"{seconds / 60:.1f} min on {args.threads} CPU thread(s). Every value is the statistic on all {n} seeds with "
        f"its 95 % bootstrap interval ({cal.BOOTSTRAP} resamples). See `--help` for the definitions.", "",
        f"Bed: ×8 bicubic SR at 64² (σ = {bed.sigma:g}), one measurement y of the cat with its striped detail; "
        f"components {', '.join(bed.captions)} with s = {cal.STD:g}, details of RMS {cal.DETAIL_RMS:g} in the 64-dim "
        f"null space of A∘decode, base weights {', '.join(f'{v:g}' for v in cal.BASE_WEIGHTS)}, β = {cal.BETA:g}. "
        f"Exact posterior weights without text: {', '.join(f'{v:.3f}' for v in target0)}. Posterior std per "
        f"direction: {bed.variance[~bed.measured].sqrt().mean():.3f} in the null space, "
        f"{bed.variance[bed.measured].sqrt().mean():.4f} (mean) in the measured directions. Same settings for every "
        "solver: its configs/solver YAML with only `steps` and `cfg_guidance` set here; null prompt \"\".", "",
        "## Mode calibration, spread and residual vs NFE (w = 0)", "",
        "| steps | solver | NFE | TV | spread meas. | spread null | residual | residual W1 | rel. L2 |",
        "|---" * 9 + "|"]
    for r in report["calibration"]:
        head = f"| {r['steps']} | {r['solver']} |"
        if "error" in r:
            lines.append(head + f" error: {r['error'].replace('|', '/')} |" + " |" * 6)
            continue
        s = r["stats"]
        lines.append(head + f" {r['nfe']} | {ci(s['tv'])} | {ci(s['spread_measured'])} | {ci(s['spread_null'])} | "
                     f"{ci(s['residual'])} | {ci(s['residual_w1'])} | {ci(s['rel_l2'], 3)} |")
    lines += ["", f"## Guidance strength: prompt \"{GUIDED}\", {args.main_steps} steps", "",
              "Target: the CFG-tilted posterior π_uc^(1−w)·π_c^w. Landed: frequency per component "
              f"({'/'.join(bed.captions)}) against the target.", "",
              "| w | solver | landed | target | TV | plain | residual |", "|---" * 7 + "|"]
    for r in report["guidance"]:
        head = f"| {r['w']:g} | {r['solver']} |"
        if "error" in r:
            lines.append(head + f" error: {r['error'].replace('|', '/')} |" + " |" * 4)
            continue
        s = r["stats"]
        landed = "/".join(f"{s[f'landed_{c}'][0]:.2f}" for c in bed.captions)
        target = "/".join(f"{v:.2f}" for v in r["runs"]["target"])
        lines.append(head + f" {landed} | {target} | {ci(s['tv'])} | {ci(s[f'landed_{GUIDED}'])} | "
                     f"{ci(s['residual'])} |")
    lines += ["", f"## Conflict: prompt \"{cal.CONFLICT}\" (ruled out by y), w = {args.conflict_w:g}, "
              f"{args.main_steps} steps", "",
              "A correct solver stays at the noise floor and lands in a component y allows (consistent = 1).", "",
              "| solver | residual | consistent | landed | target | TV |", "|---" * 6 + "|"]
    for r in report["conflict"]:
        if "error" in r:
            lines.append(f"| {r['solver']} | error: {r['error'].replace('|', '/')} |" + " |" * 4)
            continue
        s = r["stats"]
        landed = "/".join(f"{s[f'landed_{c}'][0]:.2f}" for c in bed.captions)
        target = "/".join(f"{v:.2f}" for v in r["runs"]["target"])
        lines.append(f"| {r['solver']} | {ci(s['residual'])} | {ci(s['consistent'])} | {landed} | {target} | "
                     f"{ci(s['tv'])} |")
    lines += ["", "## Sensitivity: known-wrong variants (w = 0)", "",
              "Each variant and its correct solver solve the same y with the same seeds. Flagged by: the statistics "
              "whose paired difference (variant − correct, bootstrap over the seeds jointly, "
              f"{cal.PAIRED_BOOTSTRAP} resamples) has a Bonferroni-corrected interval (95 % jointly) excluding 0, "
              "strongest first (difference over half-width in brackets); the strongest is detailed. Disjoint: the "
              "statistics whose two separate 95 % intervals do not even overlap. The control changes only rounding.",
              "", "| steps | variant | flagged by | statistic | correct | variant | difference | disjoint |",
              "|---" * 8 + "|"]
    for r in report["sensitivity"]:
        head = f"| {r['steps']} | {r['what']} |"
        failed = [side for side in ("correct", "wrong") if "error" in r[side]]
        if failed:
            lines.append(head + f" {failed[0]} solver failed: {r[failed[0]]['error']} | | | | | |")
        elif not r["flagged_by"]:
            lines.append(head + " **not flagged** | | | | | |")
        else:
            best = next(iter(r["flagged_by"]))
            flags = ", ".join(f"{k} ({v:.0f})" for k, v in r["flagged_by"].items())
            lines.append(head + f" {flags} | {best} | {ci(r['correct']['stats'][best], 3)} | "
                         f"{ci(r['wrong']['stats'][best], 3)} | {ci(r['differences'][best], 3)} | "
                         f"{', '.join(r['intervals_disjoint']) or 'none'} |")
    return "\n".join(lines)


def figure(report, path):
    """NFE curves of the calibration experiment: one panel per statistic, one line per solver with its interval,
    the exact sampler as a dashed band."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    rows = [r for r in report["calibration"] if "error" not in r]
    for ax, (key, title) in zip(axes.flat, CURVES):
        for name in dict.fromkeys(r["solver"] for r in rows):
            mine = sorted((r for r in rows if r["solver"] == name), key=lambda r: r["nfe"])
            values = [r["stats"][key] for r in mine]
            if name == "exact":  # NFE-independent: its interval as a band
                ax.axhspan(values[0][1], values[0][2], color="0.8", label="exact draws (95 % CI)")
                continue
            nfe = [r["nfe"] for r in mine]
            v = [x[0] for x in values]
            # a biased statistic (TV, W1) can lie outside its percentile interval: bars then start at the value
            bars = [[max(x[0] - x[1], 0) for x in values], [max(x[2] - x[0], 0) for x in values]]
            ax.errorbar(nfe, v, yerr=bars, marker="o",
                        ms=3, capsize=2, label=name)
        if key.startswith("spread") or key == "residual":
            ax.axhline(1.0, color="k", lw=0.5)
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("NFE per image")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="center right", fontsize=9)
    fig.suptitle("Calibration vs NFE on the exact bed (w = 0; bars: 95 % bootstrap CI over seeds)")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solvers", default=None, help="comma-separated solvers or configs/solver YAML names, e.g. "
                   "cci-noiseless (default: every entry of SOLVERS)")
    p.add_argument("--seeds", type=int, default=200, help="solver seeds per cell (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of y's noise and the first solver seed (default: 0)")
    p.add_argument("--steps", type=int_list, default=[10, 20, 50, 100, 200],
                   help="step counts of the NFE curves (default: 10,20,50,100,200)")
    p.add_argument("--main_steps", type=int, default=200, help="steps of guidance and conflict (default: 200)")
    p.add_argument("--guidance", type=float_list, default=[0.0, 1.0, 2.0, 5.0], help="w values (default: 0,1,2,5)")
    p.add_argument("--conflict_w", type=float, default=5.0, help="w of the conflict prompt (default: 5)")
    p.add_argument("--variants", default=",".join(cal.VARIANTS), help="comma-separated known-wrong variants of "
                   "treg.calibration.VARIANTS, '' for none (default: %(default)s)")
    p.add_argument("--sensitivity_steps", type=int_list, default=[10, 50],
                   help="step counts of the sensitivity check (default: 10,50)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="SOLVER.KEY=VALUE",
                   help="override a solver YAML field for the calibration, guidance and conflict cells, e.g. "
                        "cci.k_start=999 (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; the tensors are tiny (default: 1)")
    p.add_argument("--out", type=Path, default=Path("assets/calibration"), help="writes OUT.md, OUT.json, OUT.png")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.solvers = list(SOLVERS) if args.solvers is None else [s.strip() for s in args.solvers.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    return args


def check(args):
    unknown = [s for s in args.solvers if not (ROOT / f"configs/solver/{s}.yaml").exists()]
    if unknown or not args.solvers:
        raise ConfigError(f"--solvers: unknown {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(SOLVERS)} or a configs/solver YAML name")
    bad = [v for v in args.variants if v not in cal.VARIANTS]
    if bad:
        raise ConfigError(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(cal.VARIANTS)}")
    if args.seeds < 2:
        raise ConfigError("--seeds must be at least 2 (the spread needs two solutions)")
    if not args.steps or not all(1 <= s <= 1000 for s in [*args.steps, args.main_steps, *args.sensitivity_steps]):
        raise ConfigError("--steps, --main_steps and --sensitivity_steps must be in [1, 1000]")
    if not args.guidance or not all(0 <= w <= 100 for w in [*args.guidance, args.conflict_w]):
        raise ConfigError("--guidance and --conflict_w must be in [0, 100]")
    for name in args.solvers:
        solver_config(name, args.main_steps, 1.0, args.set)  # a broken YAML or --set fails here, before any work
    unused = [key for key, _ in args.set if key.split(".", 1)[0] not in args.solvers]
    if unused:
        raise ConfigError(f"--set {', '.join(unused)}: not a selected solver")


def main(argv=None):
    try:
        args = parse_args(argv)
        check(args)
    except (ConfigError, ValueError) as err:
        sys.exit(f"error: {err}")
    torch.set_num_threads(args.threads)
    total = (len(args.steps) + len(args.guidance) + 1) * len(args.solvers) + len(args.guidance) + 2 + \
        len(args.variants) * len(args.sensitivity_steps)
    begin = time.perf_counter()
    with tqdm(total=total, file=sys.stderr, unit="cell") as bar:
        bed, report = run(args, bar)
    seconds = time.perf_counter() - begin
    table = markdown(bed, report, args, seconds)
    settings = cli_args(args)
    data = {"settings": settings | {"seconds": seconds, "task": cal.TASK, "image_size": cal.IMAGE_SIZE,
                                    "std": cal.STD, "detail_rms": cal.DETAIL_RMS, "beta": cal.BETA,
                                    "base_weights": cal.BASE_WEIGHTS, "captions": bed.captions,
                                    "bootstrap": cal.BOOTSTRAP, "reference_draws": REFERENCE_DRAWS},
            **report}
    write_report(args.out, table + "\n", data)
    figure(report, Path(f"{args.out}.png"))
    print(table)


if __name__ == "__main__":
    main()
