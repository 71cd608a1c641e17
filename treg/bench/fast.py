"""Accuracy per NFE on the exact bed: CCI, ΠGDM and DDRM at 5, 10 and 20 steps against TReg at 200 steps and
TReg and DPS at the same step counts, all scored against the exact posterior. The bed, the columns and the flags
are described with its command line, `fast` in treg/bench/flags.py (`python -m treg bench fast --help`); main(argv)
is run(flags.fast(argv)).
"""
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from treg.bench import flags
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


def run(args):
    """The benchmark for flags.fast's arguments: writes the report and its figure, and prints the table."""
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


def main(argv=None):
    run(flags.fast(argv))


if __name__ == "__main__":
    main()
