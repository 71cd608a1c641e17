"""Accuracy per NFE on the exact bed: CCI, ΠGDM and DDRM at 5, 10 and 20 steps against TReg at 200 steps and
TReg and DPS at the same step counts, all scored against the exact posterior.

Bed: the analytic prior of `--model analytic` (AnalyticPrior.from_folder(): 4 low-resolution groups × 4 details
that ×16 SR cannot see, s = 0.03) at --image_size (64: latent 4×8×8), σ_y = the task's noise_scale, the null
prompt "out of focus, depth of field". Seed j measures x = decode(μ_(i,i)), i = j mod 4 (sample image i with its
own detail, so that y is realisable by the prior; a real photo is not, outside SR), with y = A x + σn; its exact
posterior (treg.priors.posterior's formulas with a dense MᵀM) is a mixture Σ_k w_k N(m_k, Σ). The row "exact" scores
exact posterior samples (k ~ w, z ~ N(m_k, Σ)) the same way: the numbers a calibrated sampler would get.
Text settings: "true" (the image's caption), "other" (the next image's caption), "w=0" (null prompt only).
Every solver uses its configs/solver YAML with `steps` set, cfg_guidance = --cfg_guidance (0 for w=0), σ_y = the
task's noise, TReg with the README flags (adaptive negation, null_lr 1e-3). Columns (mean over seeds, ± the 95%
interval half-width; Wilson interval for fractions):
    residual     ‖y − A x̂‖/(σ√m), 1 = the noise floor (compare with the "exact" row, not with 1)
    prompt acc.  fraction landing in the prompted component (largest posterior weight among the prompt's caption)
    mode TV      total variation between where solutions land (per detail caption) and the posterior's weights
    within-mode  ‖E(x̂) − m_k‖ / √tr Σ for the component k landed in: ≈ 1 for an exact posterior sample (its
                 spread), ≪ 1 collapsed onto the mean, ≫ 1 off the posterior
    NFE          noise-prediction evaluations per image (CFG counts 2); backward passes are extra for cci, pigdm, dps

    python -m treg bench fast                               # 2 tasks × 3 settings × 8 seeds × 16 methods, 28 s
    python -m treg bench fast --seeds 2 --tasks super-resolution --methods cci-5,treg-200 --out /tmp/fast

Writes OUT.md, OUT.json and OUT.png (default runs/fast; `--out assets/fast` refreshes the committed report) and
prints the table. Offline: analytic prior only.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from treg.config import ROOT, SAMPLES, ConfigError, load_task
from treg.images import atomic_write
from treg.operators import build_operator, measure
from treg.priors.analytic import AnalyticPrior
from treg.priors.posterior import dense_posterior, landed_component, latent_gram
from treg.profiling import PRIOR_PARTS, Profiler
from treg.runs import cli_args, markdown_table, mean_interval, write_report
from treg.solvers import configure
from treg.solvers.latent import residual_norm

NULL_PROMPT = "out of focus, depth of field"
SETTINGS = ("true", "other", "w=0")
FEW_STEP = ("cci", "pigdm", "ddrm", "treg", "dps", "diffpir", "daps")
METHODS = [(name, steps) for name in FEW_STEP for steps in (5, 10, 20)] + [("treg", 200)]
README_FLAGS = {"treg": {"use_AN": True, "null_lr": 1e-3}}  # the official README commands


def wilson(hits, n, z=1.96):
    """95% Wilson interval (low, high) of a fraction."""
    p = hits / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return centre - half, centre + half


def solver_config(name, steps, setting, sigma, w):
    """(solver function, config) of configs/solver/<name>.yaml (which names its solver: cci-noiseless → cci) with
    `steps`, the setting's cfg_guidance and, where the solver models y's noise and the YAML leaves it unset, σ_y."""
    return configure(name, steps, 0.0 if setting == "w=0" else w, README_FLAGS.get(name, {}), sigma)


def run_task(task_name, args, bar):
    task = load_task(ROOT / f"configs/task/{task_name}.yaml", args.image_size)
    op = build_operator(task.operator, task.image_size, **task.params)
    sigma = task.noise_scale if args.noise_scale is None else args.noise_scale
    prior = AnalyticPrior.from_folder()
    h = task.image_size // prior.vae_scale_factor
    gram, *_ = latent_gram(prior, op, (prior.latent_channels, h, h))
    eye = torch.eye(len(gram), dtype=torch.float64)
    cov = torch.linalg.inv(eye / prior.std ** 2 + gram / sigma ** 2)  # Σ, shared by every component and y
    spread, chol = cov.trace().sqrt().item(), torch.linalg.cholesky((cov + cov.T) / 2)
    names = sorted({c: None for c in prior.captions})  # the K detail captions
    images = [SAMPLES / p.name for p in prior.image_paths]
    captions = [prior.captions[len(images) * i + i] for i in range(len(images))]  # caption of image i
    seeds = list(range(args.seed, args.seed + args.seeds))
    truth = [j % len(images) for j in range(len(seeds))]
    mu = prior.means(h, h)
    x = prior.decode(torch.stack([mu[len(images) * t + t] for t in truth])).float()  # image t with its own detail
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    y = measure(op, x, sigma, gens)
    after_y = [g.get_state() for g in gens]
    floor = sigma * y[0].numel() ** 0.5
    uc = prior.embed([NULL_PROMPT])
    rows = []
    for setting in SETTINGS:
        prompts = [NULL_PROMPT if setting == "w=0" else captions[t if setting == "true" else (t + 1) % len(images)]
                   for t in truth]
        c = prior.embed(prompts)
        posts = [dense_posterior(prior, op, gram, y[j:j + 1], prompts[j], sigma) for j in range(len(seeds))]
        weights = torch.stack([p.log_weights.exp() for p in posts])  # (N, K²)
        expected = {cap: sum(weights[:, i].sum().item() for i, cp in enumerate(prior.captions) if cp == cap)
                    for cap in names}
        for name, steps in [("exact", 0)] + args.methods:
            bar.set_description(f"{task_name} {setting} {name}-{steps}")
            for g, state in zip(gens, after_y):
                g.set_state(state)
            begin = time.perf_counter()
            if name == "exact":  # exact posterior samples: k ~ w, z = m_k + chol(Σ)·n; the calibrated yardstick
                cfg, nfe = None, 0
                z = [post.means[torch.multinomial(post.log_weights.exp(), 1, generator=g)][0]
                     + (chol @ torch.randn(len(chol), generator=g, dtype=torch.float64)).view(post.means.shape[1:])
                     for post, g in zip(posts, gens)]
                x_hat = prior.decode(torch.stack(z)).float()
            else:
                fn, cfg = solver_config(name, steps, setting, sigma, args.cfg_guidance)
                profiler = Profiler("cpu")
                x_hat = fn(profiler.wrap(prior, PRIOR_PARTS), op, y, cfg, c=c, uc=uc, generator=gens)
                nfe = profiler.report(time.perf_counter() - begin, len(seeds))["nfe"]
            wall = time.perf_counter() - begin
            residual = (residual_norm(op, y, x_hat) / floor).tolist()
            hits, distance, landed = [], [], {cap: 0 for cap in names}
            for j, post in enumerate(posts):
                k, _ = landed_component(prior, x_hat[j:j + 1], post)
                k = k.item()
                landed[prior.captions[k]] += 1
                distance.append((prior.encode(x_hat[j:j + 1]).double()[0] - post.means[k]).norm().item() / spread)
                if setting != "w=0":
                    target = max((i for i, cp in enumerate(prior.captions) if cp == prompts[j]),
                                 key=lambda i: weights[j, i])
                    hits.append(k == target)
            tv = 0.5 * sum(abs(landed[cap] - expected[cap]) for cap in names) / len(seeds)
            rows.append({"task": task_name, "setting": setting, "solver": name, "steps": steps,
                         "cfg_guidance": getattr(cfg, "cfg_guidance", None), "nfe": nfe, "seconds": wall / len(seeds),
                         "residual": mean_interval(residual), "hits": sum(hits) if hits else None, "seeds": len(seeds),
                         "mode_tv": tv, "within_mode": mean_interval(distance), "landed": landed, "expected": expected})
            bar.update()
    return rows, {"spread": spread, "std": prior.std, "noise_scale": sigma, "floor": floor}


def table(rows):
    out = {}
    for r in rows:
        acc = "–" if r["hits"] is None else "{:.2f} [{:.2f}, {:.2f}]".format(
            r["hits"] / r["seeds"], *wilson(r["hits"], r["seeds"]))
        name = r["solver"] if r["solver"] == "exact" else f"{r['solver']}-{r['steps']}"
        out[f"{r['task']} · {r['setting']} · {name}"] = {
            "NFE": f"{r['nfe']:.0f}", "residual": "{:.2f} ± {:.2f}".format(*r["residual"]), "prompt acc.": acc,
            "mode TV": f"{r['mode_tv']:.2f}", "within-mode": "{:.2f} ± {:.2f}".format(*r["within_mode"]),
            "s/image": f"{r['seconds']:.3f}"}
    return markdown_table(out, ["NFE", "residual", "prompt acc.", "mode TV", "within-mode", "s/image"])


def figure(rows, path):
    """Residual, prompt accuracy and within-mode distance against NFE for the "true" setting, one row per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.6 * len(tasks)), squeeze=False)
    metrics = [("residual / noise floor", lambda r: r["residual"][0]),
               ("prompt accuracy", lambda r: r["hits"] / r["seeds"]),
               ("within-mode distance / posterior spread", lambda r: r["within_mode"][0])]
    for row_axes, task in zip(axes, tasks):
        mine = [r for r in rows if r["task"] == task and r["setting"] == "true"]
        for ax, (label, value) in zip(row_axes, metrics):
            few = [r for r in mine if r["solver"] != "exact" and r["steps"] <= 20]
            for name in dict.fromkeys(r["solver"] for r in few):
                ax.plot(*zip(*sorted((r["nfe"], value(r)) for r in few if r["solver"] == name)), marker="o", label=name)
            for ref in [r for r in mine if r["steps"] > 20]:  # long runs (TReg-200) as reference lines
                ax.axhline(value(ref), color="k", ls="--", lw=1, label=f"{ref['solver']}-{ref['steps']}")
            exact = [r for r in mine if r["solver"] == "exact"][0]
            ax.axhline(value(exact), color="grey", ls=":", lw=1.5, label="exact posterior samples")
            ax.set_xscale("log")
            ax.set_xlabel("NFE per image")
            ax.set_title(f"{task}: {label}", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m treg bench fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="super-resolution,inpainting", help="configs/task names (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per (task, setting) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=64, help="image side, at most 128 (default: %(default)s)")
    p.add_argument("--cfg_guidance", type=float, default=5.0, help="w of the text settings (README: 5.0)")
    p.add_argument("--noise_scale", type=float, default=None, help="std of y's noise (default: the task's, 0.01)")
    p.add_argument("--methods", default=",".join(f"{n}-{s}" for n, s in METHODS),
                   help="comma-separated SOLVER-STEPS; SOLVER is a configs/solver YAML name, e.g. cci-noiseless "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/fast"), help="writes OUT.md, OUT.json, OUT.png "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.methods = [m.strip().rpartition("-") for m in args.methods.split(",") if m.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    begin = time.perf_counter()
    torch.set_num_threads(1)
    try:
        bad = [f"{n}-{s}" for n, _, s in args.methods
               if not (ROOT / f"configs/solver/{n}.yaml").exists() or not s.isdigit()]
        if bad or not args.methods:
            raise ConfigError(f"--methods: not SOLVER-STEPS with a configs/solver YAML: {', '.join(bad) or '(none)'}")
        if args.noise_scale is not None and not 0 < args.noise_scale <= 1:
            raise ConfigError(f"--noise_scale must be in (0, 1], got {args.noise_scale}")
        args.methods = [(n, int(s)) for n, _, s in args.methods]
        if args.seeds < 2 or args.image_size > 128:
            raise ConfigError("--seeds must be at least 2 (for intervals) and --image_size at most 128 (dense MᵀM)")
        rows, tasks = [], {}
        total = len(args.tasks) * len(SETTINGS) * (len(args.methods) + 1)
        with tqdm(total=total, file=sys.stderr, unit="solve") as bar:
            for name in args.tasks:
                r, tasks[name] = run_task(name, args, bar)
                rows += r
    except ConfigError as err:
        sys.exit(f"error: {err}")
    sigma = tasks[args.tasks[0]]["noise_scale"]
    text = (f"Accuracy per NFE on the exact bed (analytic prior, {args.image_size}², {args.seeds} seeds per row, "
            f"cfg_guidance {args.cfg_guidance:g}, σ_y {sigma:g}; `python -m treg bench fast --help` defines the "
            f"columns; {time.perf_counter() - begin:.0f} s).\n\n" + table(rows))
    write_report(args.out, text + "\n", {"settings": cli_args(args), "tasks": tasks, "rows": rows,
                                         "seconds": time.perf_counter() - begin})
    figure(rows, Path(f"{args.out}.png"))
    print(text)


if __name__ == "__main__":
    main()
