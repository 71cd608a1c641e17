"""Calibration benchmark against an exact multi-modal posterior: does each solver *sample* the posterior, what does
guidance do to that, what happens when the text contradicts the data, how does it all degrade as NFE falls, and do
these numbers catch known-wrong solvers? The experiments, the statistics and the flags are described with its
command line, `calibration` in treg/bench/flags.py (`python -m treg bench calibration --help`); main(argv) is
run(flags.calibration(argv)).
"""
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy.stats import binomtest
from tqdm import tqdm

from treg.bench import beds as cal, flags
from treg.config import CONFIGS, ROOT, ConfigError, load_task
from treg.images import atomic_write
from treg.profiling import PRIOR_PARTS, Profiler
from treg.runs import cli_args, write_report
from treg.solvers import SOLVERS, configure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

GUIDED = "plain"      # the guided prompt names the rarest detail, so that guidance visibly moves the weights
REFERENCE_DRAWS = 4000
CFG_DRAWS = 2000      # draws of the exact CFG sampler per (prompt, w): a landing frequency to ±0.022 (95 %)
CFG_STEPS = 100       # its Heun steps; the report shows the law at half and twice as many
CURVES = [("tv", "TV to the posterior weights"), ("spread_null", "spread ratio, null space"),
          ("spread_measured", "spread ratio, measured"), ("residual", "residual / noise floor"),
          ("residual_w1", "residual W1 to the exact"), ("rel_l2", "rel. L2 to nearest mean")]


def solver_of(name):
    """The solver function that configs/solver/<name>.yaml names (cci → cci, cci-noiseless → cci)."""
    return configure(name)[0]


def solver_config(name, steps, w, sets=()):
    """configs/solver/<name>.yaml with --set's (SOLVER.KEY, value) pairs for it, then `steps` and `cfg_guidance`,
    and the bed's σ_y where the solver models y's noise (CCI, ΠGDM, DDRM)."""
    overrides = {key.split(".", 1)[1]: value for key, value in sets if key.split(".", 1)[0] == name}
    return configure(name, steps, w, overrides, load_task(CONFIGS / f"task/{cal.TASK}.yaml").noise_scale)[1]


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
    """Targets, exact reference residuals and the exact CFG sampler's landing laws, cached per (prompt, w)."""

    def __init__(self, bed, seeds, cfg_draws=None, cfg_steps=None):
        self.bed, self.seeds, self.cache, self.laws = bed, seeds, {}, {}
        self.cfg_draws, self.cfg_steps = cfg_draws or CFG_DRAWS, cfg_steps or CFG_STEPS

    def target(self, prompt, w):
        if (prompt, w) not in self.cache:
            log_w = self.bed.tilted_log_weights(prompt, w)
            z, _ = self.bed.exact_draws(log_w, REFERENCE_DRAWS, torch.Generator().manual_seed(1))
            self.cache[prompt, w] = log_w, self.bed.residuals(z).numpy()
        return self.cache[prompt, w]

    def landed(self, z):
        return torch.cdist(z.double().flatten(1), self.bed.means).argmin(1).numpy()

    def law(self, prompt, w, with_y=True):
        """The exact CFG sampler's landing law (K,) (cal.cfg_ode with cfg_steps Heun steps, cfg_draws draws), with
        its convergence record: the law at cfg_steps/2 and 2·cfg_steps, how many draws land elsewhere than at
        2·cfg_steps (the same noise), and the law from the samplers' start σ(ᾱ_999)."""
        if (prompt, w, with_y) not in self.laws:
            field = cal.CFGField(self.bed, prompt, w, with_y)
            noise = torch.randn(self.cfg_draws, len(self.bed.variance), generator=torch.Generator().manual_seed(3),
                                dtype=torch.float64)
            count = len(self.bed.captions)
            runs = {steps: self.landed(cal.cfg_ode(field, noise, steps))
                    for steps in (self.cfg_steps // 2, self.cfg_steps, 2 * self.cfg_steps)}
            start = ((1 - self.bed.prior.alphas_cumprod[-1].item()) / self.bed.prior.alphas_cumprod[-1].item()) ** 0.5
            runs["samplers' start"] = self.landed(cal.cfg_ode(field, noise, self.cfg_steps, sigma_max=start))
            finest = runs[2 * self.cfg_steps]
            record = {str(k): {"law": np.bincount(v, minlength=count).tolist(),
                               "moved": int((v != finest).sum())} for k, v in runs.items()}
            law = np.bincount(runs[self.cfg_steps], minlength=count) / self.cfg_draws
            self.laws[prompt, w, with_y] = law, record
        return self.laws[prompt, w, with_y]

    def exact_row(self, prompt, w):
        log_w, reference = self.target(prompt, w)
        z, _ = self.bed.exact_draws(log_w, len(self.seeds), torch.Generator().manual_seed(2))
        fns, runs = cal.statistics(self.bed, z, log_w, reference)
        return {"solver": "exact", "nfe": 0, "seconds": 0.0, "stats": cal.intervals(fns, len(z)), "runs": runs}

    def exact_cfg_row(self, prompt, w):
        """len(seeds) draws of the exact CFG sampler with y (other noise than its law's)."""
        log_w, reference = self.target(prompt, w)
        law, _ = self.law(prompt, w)
        noise = torch.randn(len(self.seeds), len(self.bed.variance), generator=torch.Generator().manual_seed(4),
                            dtype=torch.float64)
        z = cal.cfg_ode(cal.CFGField(self.bed, prompt, w), noise, self.cfg_steps).view(-1, *self.bed.latent_shape)
        fns, runs = cal.statistics(self.bed, z, log_w, reference, law)
        return {"solver": "exact CFG", "nfe": 0, "seconds": 0.0, "stats": cal.intervals(fns, len(z)), "runs": runs}

    def solve(self, fn, cfg, prompt, seeds=None):
        return solve_cell(self.bed, fn, cfg, prompt, self.seeds if seeds is None else seeds)

    def row(self, name, fn, cfg, prompt, w, seeds=None, law=None):
        """(row, statistics, latents) of one cell; a failing solver is an `error` row (statistics None), not the end
        of the benchmark. `law`: the exact CFG landing law, for tv_cfg."""
        log_w, reference = self.target(prompt, w)
        try:
            z, nfe, seconds = self.solve(fn, cfg, prompt, seeds)
        except Exception as err:  # noqa: BLE001
            first = str(err).splitlines()[0][:120] if str(err) else ""
            return {"solver": name, "error": f"{type(err).__name__}: {first}"}, None, None
        fns, runs = cal.statistics(self.bed, z, log_w, reference, law)
        row = {"solver": name, "nfe": nfe, "seconds": seconds, "stats": cal.intervals(fns, len(z)), "runs": runs}
        return row, fns, z

    def sensitivity(self, label, steps):
        """A known-wrong variant against its solver, both at w = 0 with the same seeds (the control: the correct
        solver on the next len(seeds) seeds): the paired differences of every statistic, their permutation
        p-values and the statistics that flag it."""
        if label == cal.CONTROL[0]:
            base, fn, what = cal.CONTROL[1], SOLVERS[cal.CONTROL[1]][0], cal.CONTROL[2]
            other = [s + len(self.seeds) for s in self.seeds]
        else:
            (base, fn), what, other = cal.variant(label), cal.VARIANTS[label][1], None
        cfg = solver_config(base, steps, 0.0)
        correct, correct_fns, z_correct = self.row(base, SOLVERS[base][0], cfg, "", 0.0)
        wrong, wrong_fns, z_wrong = self.row(label, fn, cfg, "", 0.0, seeds=other)
        row = {"variant": label, "what": what, "solver": base, "steps": steps, "correct": correct, "wrong": wrong}
        if correct_fns is None or wrong_fns is None:
            return row
        n = len(self.seeds)
        differences = cal.paired_differences(correct_fns, wrong_fns, n)
        pooled, _ = cal.statistics(self.bed, torch.cat([z_correct, z_wrong]), *self.target("", 0.0))
        pvalues = cal.permutation_pvalues(pooled, n)
        apart = [k for k in differences if correct["stats"][k][2] < wrong["stats"][k][1]
                 or wrong["stats"][k][2] < correct["stats"][k][1]]  # the two cells' own 95 % intervals are disjoint
        return row | {"differences": differences, "pvalues": pvalues, "flagged_by": cal.flagged(pvalues),
                      "intervals_disjoint": apart}

    def false_flags(self, n, repeats):
        """The sensitivity rule's false-flag rate under a genuine null (cal.false_flag_rate) at n seeds."""
        log_w, reference = self.target("", 0.0)
        return {"n": n, **cal.false_flag_rate(self.bed, log_w, reference, n, repeats, seed=n)}


def experiments(args, bar):
    """The bed and every experiment's rows: calibration, guidance, conflict, the exact CFG laws, sensitivity and the
    false-flag rate."""
    bed = cal.build_bed(ROOT, args.seed)
    ex = Experiment(bed, list(range(args.seed, args.seed + args.seeds)))
    report = {"calibration": [], "guidance": [], "conflict": [], "cfg_laws": [], "sensitivity": [], "false_flags": []}

    def add(section, row, **keys):
        report[section].append({**keys, **row})
        bar.update()

    add("calibration", ex.exact_row("", 0.0), steps="any")  # the same draws at every step count
    for steps in args.steps:
        for name in args.solvers:
            bar.set_description(f"calibration {name} {steps} steps")
            add("calibration", ex.row(name, solver_of(name), solver_config(name, steps, 0.0, args.set), "", 0.0)[0],
                steps=steps)
    cells = [("guidance", GUIDED, w) for w in args.guidance] + [("conflict", cal.CONFLICT, args.conflict_w)]
    for section, prompt, w in cells:
        bar.set_description(f"exact CFG sampler, {prompt} w={w:g}")
        law, record = ex.law(prompt, w)
        prior_law, prior_record = ex.law(prompt, w, with_y=False)
        report["cfg_laws"].append({"prompt": prompt, "w": w, "law": law.tolist(), "convergence": record,
                                   "prior_law": prior_law.tolist(), "prior_convergence": prior_record})
        add(section, ex.exact_row(prompt, w), w=w)
        add(section, ex.exact_cfg_row(prompt, w), w=w)
        for name in args.solvers:
            bar.set_description(f"{section} {name} w={w:g}")
            cfg = solver_config(name, args.main_steps, w, args.set)
            add(section, ex.row(name, solver_of(name), cfg, prompt, w, law=law)[0], w=w)
    for steps in args.sensitivity_steps:
        for label in args.variants:
            bar.set_description(f"sensitivity {label} {steps} steps")
            report["sensitivity"].append(ex.sensitivity(label, steps))
            bar.update()
    if args.variants:
        for n in dict.fromkeys([args.seeds, flags.TEST_SEEDS]):
            bar.set_description(f"false-flag rate at {n} seeds")
            report["false_flags"].append(ex.false_flags(n, args.null_repeats))
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
        f"`python -m treg bench calibration {shlex.join(args.argv)}`".replace(" `", "`") + f": {n} seeds per cell, "
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
    laws = {(r["prompt"], r["w"]): r for r in report["cfg_laws"]}
    captions = "/".join(bed.captions)
    lines += ["", f"## Guidance strength: prompt \"{GUIDED}\", {args.main_steps} steps", "",
              "Two targets. Tilted: the exact posterior of the CFG-tilted prior π_uc^(1−w)·π_c^w (`exact` draws from "
              "it). CFG: the landing law of the exact CFG sampler, the guided probability-flow ODE with the exact "
              "noise prediction and y's exact likelihood term (`exact CFG` draws from it; its law and convergence "
              "below). They agree at w = 0 and 1 and part above. Landed: frequency per component "
              f"({captions}); TV tilted / TV CFG: to each target; plain: the frequency of \"{GUIDED}\".", "",
              "| w | solver | landed | tilted | CFG | TV tilted | TV CFG | plain | residual |", "|---" * 9 + "|"]
    lines += guided_rows(bed, report["guidance"], laws, GUIDED)
    lines += ["", f"## Conflict: prompt \"{cal.CONFLICT}\" (ruled out by y), w = {args.conflict_w:g}, "
              f"{args.main_steps} steps", "",
              "A correct solver stays at the noise floor and lands in a component y allows (consistent = 1).", "",
              "| w | solver | landed | tilted | CFG | TV tilted | TV CFG | consistent | residual |",
              "|---" * 9 + "|"]
    lines += guided_rows(bed, report["conflict"], laws, cal.CONFLICT, consistent=True)
    lines += ["", "## The exact CFG sampler's landing law", "",
              f"cal.cfg_ode: Heun's method on a geometric σ grid from σ = {cal.SIGMA_MAX:g} (ᾱ = 1e-8, where every "
              f"noised law is N(0, I)) to {cal.SIGMA_MIN:g}, then the Tweedie step; {CFG_DRAWS} draws with the same "
              "noise at every step count. Each law with its exact 95 % binomial interval per component "
              f"(Clopper–Pearson); moved: draws that land elsewhere than with {2 * CFG_STEPS} steps. With y: the "
              "guided score plus y's exact likelihood (the solvers' target); prior only: without y (`ddim`'s "
              "target). Samplers' start: the same ODE begun from N(0, I) at ᾱ_999 (σ = 14.6), where the solvers "
              "begin, not at its exact start.", "",
              f"| prompt | w | field | steps | landed ({captions}) | {GUIDED} | moved |", "|---" * 7 + "|"]
    for r in report["cfg_laws"]:
        for field, key in (("with y", "convergence"), ("prior only", "prior_convergence")):
            for steps, c in r[key].items():
                draws = sum(c["law"])
                freq = "/".join(f"{v / draws:.3f}" for v in c["law"])
                k = c["law"][bed.captions.index(GUIDED)]
                lines.append(f"| {r['prompt']} | {r['w']:g} | {field} | {steps} | {freq} | "
                             f"{binomial(k, draws)} | {c['moved']} |")
    lines += ["", "## Sensitivity: known-wrong variants (w = 0)", "",
              "Each variant and its correct solver solve the same y with the same seeds; the control is the correct "
              "TReg on the next n seeds (a genuine null: two independent cells). Flagged by: the statistics whose "
              f"paired sign-flip permutation test ({cal.PERMUTATIONS} flips) gives p ≤ {cal.FAMILY_LEVEL:g}/"
              f"{len(cal.TESTED)} (Bonferroni: familywise "
              f"{cal.FAMILY_LEVEL:g}), smallest p first; the strongest is detailed with its paired difference "
              f"(variant − correct, bootstrap over the seeds jointly, {cal.PAIRED_BOOTSTRAP} resamples, "
              "Bonferroni-corrected interval). Disjoint: the statistics whose two separate 95 % intervals do not "
              "even overlap.", "",
              "| steps | variant | flagged by (p) | statistic | correct | variant | difference | disjoint |",
              "|---" * 8 + "|"]
    for r in report["sensitivity"]:
        head = f"| {r['steps']} | {r['what']} |"
        failed = [side for side in ("correct", "wrong") if "error" in r[side]]
        if failed:
            lines.append(head + f" {failed[0]} solver failed: {r[failed[0]]['error']} | | | | | |")
        elif not r["flagged_by"]:
            best = min(r["pvalues"], key=r["pvalues"].get)
            lines.append(head + f" **not flagged** (smallest p: {best} {r['pvalues'][best]:.3g}) | | | | | |")
        else:
            best = next(iter(r["flagged_by"]))
            flagged = ", ".join(f"{k} ({v:.2g})" for k, v in r["flagged_by"].items())
            lines.append(head + f" {flagged} | {best} | {ci(r['correct']['stats'][best], 3)} | "
                         f"{ci(r['wrong']['stats'][best], 3)} | {ci(r['differences'][best], 3)} | "
                         f"{', '.join(r['intervals_disjoint']) or 'none'} |")
    if report["false_flags"]:
        lines += ["", "## False-flag rate under a genuine null", "",
                  "Two independent cells of n exact posterior draws (w = 0), repeated; a repeat counts if any "
                  "statistic flags. Permutation: the rule above. Bootstrap: the previous rule (a Bonferroni-corrected "
                  "paired bootstrap interval excluding 0). Rates with exact 95 % binomial intervals; nominal "
                  f"{cal.FAMILY_LEVEL:g}. n = {flags.TEST_SEEDS} is the seed count of tests/test_calibration.py.", "",
                  "| n | repeats | permutation rule | bootstrap rule |", "|---" * 4 + "|"]
        for r in report["false_flags"]:
            (k, m), (kb, _) = r["permutation"], r["bootstrap"]
            lines.append(f"| {r['n']} | {m} | {k}/{m} = {binomial(k, m)} | {kb}/{m} = {binomial(kb, m)} |")
    return "\n".join(lines)


def binomial(k, n):
    """k/n with its exact (Clopper–Pearson) 95 % interval."""
    ci_ = binomtest(k, n).proportion_ci()
    return f"{k / n:.3f} [{ci_.low:.3f}, {ci_.high:.3f}]"


def guided_rows(bed, rows, laws, prompt, consistent=False):
    """Table rows of the guidance or conflict experiment: landing against the tilted target and the CFG law."""
    out = []
    for r in rows:
        head = f"| {r['w']:g} | {r['solver']} |"
        if "error" in r:
            out.append(head + f" error: {r['error'].replace('|', '/')} |" + " |" * 6)
            continue
        s = r["stats"]
        law = laws[prompt, r["w"]]["law"]
        tv_cfg = (ci(s["tv_cfg"]) if "tv_cfg" in s
                  else f"{0.5 * np.abs(np.array(law) - r['runs']['target']).sum():.2f} (laws)")
        landed = "/".join(f"{s[f'landed_{c}'][0]:.2f}" for c in bed.captions)
        target = "/".join(f"{v:.2f}" for v in r["runs"]["target"])
        last = ci(s["consistent"]) if consistent else ci(s[f"landed_{prompt}"])
        out.append(head + f" {landed} | {target} | {'/'.join(f'{v:.2f}' for v in law)} | {ci(s['tv'])} | "
                   f"{tv_cfg} | {last} | {ci(s['residual'])} |")
    return out


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


def check(args):
    unknown = [s for s in args.solvers if not (ROOT / f"configs/solver/{s}.yaml").exists()]
    if unknown or not args.solvers:
        raise ConfigError(f"--solvers: unknown {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(SOLVERS)} or a configs/solver YAML name")
    bad = [v for v in args.variants if v not in cal.VARIANTS and v != cal.CONTROL[0]]
    if bad:
        raise ConfigError(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(cal.VARIANTS)}, "
                          f"{cal.CONTROL[0]}")
    if args.null_repeats < 1:
        raise ConfigError("--null_repeats must be at least 1")
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


def run(args):
    """The benchmark for flags.calibration's arguments: writes the report and its figure, and prints the tables."""
    if args.solvers is None:
        args.solvers = list(SOLVERS)
    if args.variants is None:
        args.variants = [*cal.VARIANTS, cal.CONTROL[0]]
    try:
        check(args)
    except (ConfigError, ValueError) as err:
        sys.exit(f"error: {err}")
    torch.set_num_threads(args.threads)
    total = (len(args.steps) + len(args.guidance) + 1) * len(args.solvers) + 2 * (len(args.guidance) + 1) + 1 + \
        len(args.variants) * len(args.sensitivity_steps) + (len({args.seeds, flags.TEST_SEEDS}) if args.variants else 0)
    begin = time.perf_counter()
    with tqdm(total=total, file=sys.stderr, unit="cell") as bar:
        bed, report = experiments(args, bar)
    seconds = time.perf_counter() - begin
    table = markdown(bed, report, args, seconds)
    settings = cli_args(args)
    data = {"settings": settings | {"seconds": seconds, "task": cal.TASK, "image_size": cal.IMAGE_SIZE,
                                    "std": cal.STD, "detail_rms": cal.DETAIL_RMS, "beta": cal.BETA,
                                    "base_weights": cal.BASE_WEIGHTS, "captions": bed.captions,
                                    "bootstrap": cal.BOOTSTRAP, "reference_draws": REFERENCE_DRAWS,
                                    "permutations": cal.PERMUTATIONS, "cfg_draws": CFG_DRAWS,
                                    "cfg_steps": CFG_STEPS},
            **report}
    write_report(args.out, table + "\n", data)
    figure(report, Path(f"{args.out}.png"))
    print(table)


def main(argv=None):
    run(flags.calibration(argv))


if __name__ == "__main__":
    main()
