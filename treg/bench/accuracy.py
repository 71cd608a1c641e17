"""Accuracy benchmark against the exact posterior: does each solver fit y, and does the prompt choose the solution?

For each task (configs/task/<name>.yaml at --image_size), text setting and seed, every solver of treg.solvers.SOLVERS
(its configs/solver/<name>.yaml, --steps and --set applied) solves y = A x + σn on an analytic prior built so that
only the text can choose (`grid_prior`): components μ_(i,k) = encode(x_i) + δ_k for sample images x_i and "details"
δ_k that the measurement cannot see, captioned with image k's caption. y of image i selects the group i (its
visible content); within it the K details are ambiguous and the exact posterior weights follow the text. Seed j
measures x = decode(μ_(j,j)) (image j mod K with its own detail). Text settings:
    w=0    no text: the prompt is the null prompt and cfg_guidance = 0 (for solvers with that field);
    true   the caption of the measured image's detail;
    other  the caption of the next image (k + 1 mod K);
for the last two cfg_guidance is --cfg_guidance, or the solver YAML's value (at least 1, so the prompt is used).
Columns (means over seeds):
    residual      ‖y − A x̂‖ / (σ√m), 1 = the noise floor;
    prompt acc.   fraction of solutions that land in the prompted component: the component with the prompt's
                  caption of largest exact posterior weight under that prompt (–  for w=0);
    landed        where solutions land: counts per detail caption among components of posterior weight ≥ 1e-3,
                  "off" for the rest (not measurement-consistent), then the counts the exact posterior expects;
                  for w=0 this is the landing distribution against the posterior (≈ prior) weights;
    post. weight  exact posterior weight of the component landed in (the nearest posterior mean to E(x̂));
    rel. L2       ‖E(x̂) − m_k‖ / ‖m_k‖ to that nearest posterior mean m_k;
    NFE           noise-prediction evaluations per image (each latent in an eps batch counts one; CFG counts 2);
    s/solve       wall time per image (seeds are solved as one batch).
Solutions are scored as returned, not clamped to [-1, 1]. Blur leaves no latent direction unseen at 64 px (M is
injective on latents), so there the details lie along the weakest directions, seen in y at ≤ 0.5σ (the posterior
weights then move slightly with y), and s shrinks to keep them ≥ 20 s apart. The default grid takes ~6 min on one
CPU core, ~5 of them PSLD on motion blur (a 50-step CG pseudo-inverse of the blur, backpropagated, at each of 200
steps); ~1 min without it.

    python -m treg.bench_accuracy                                  # 4 tasks × 3 settings × 5 seeds × every solver
    python -m treg.bench_accuracy --solvers treg,ddim --tasks super-resolution-x8 --seeds 10 \\
        --set treg.use_AN=true --set treg.null_lr=1e-3 --cfg_guidance 5      # TReg with the README flags

Writes OUT.md and OUT.json (default assets/accuracy) and prints the table. Offline: the analytic prior only.
"""
import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from treg.analytic import SAMPLES, AnalyticPrior, load_image
from treg.config import ConfigError, load_solver, load_task
from treg.fast import with_noise
from treg.operators import build_operator, measure
from treg.posterior import ExactPosterior, landed_component, linear_map
from treg.profiling import PRIOR_PARTS, Profiler
from treg.runs import cli_args, write_report
from treg.solvers import SOLVERS, residual_norm

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("super-resolution", "gauss-deblur", "motion-deblur", "inpainting")
IMAGES = ("cat_1.jpg", "coffee.jpg", "rocket.jpg")
NULL_PROMPT = "out of focus, depth of field"
SETTINGS = ("w=0", "true", "other")
SUPPORT = 1e-3  # posterior weight below which a landing is "off" (inconsistent with y)


def latent_gram(prior, op, shape):
    """(MᵀM as a dense (n, n) float64 matrix, M, Mᵀ) for M = A∘decode on latents of `shape` (n = 4hw ≤ 1024)."""
    forward, adjoint = linear_map(prior, op)
    n = math.prod(shape)
    gram = adjoint(forward(torch.eye(n, dtype=torch.float64).view(n, *shape))).flatten(1)
    return (gram + gram.T) / 2, forward, adjoint


def hidden_details(gram, forward, shape, sigma, count, rms=0.1, visible=0.5, seed=0):
    """`count` orthogonal latent "details" (count, *shape) float64 that the measurement M cannot see.

    If M has a null space (SR, inpainting), the details are random orthogonal directions in it of RMS `rms` per
    latent value. If not (blur: M is injective on latents, only weakly on some directions), they lie along the
    weakest eigenvectors of MᵀM, scaled down until every pair differs by at most visible·σ in the measurement,
    i.e. below the noise. Also returns a dict describing them.
    """
    lam, vec = torch.linalg.eigh(gram)
    lam = lam.clamp(min=0)
    n = len(lam)
    null = int((lam <= 1e-9 * lam.max()).sum())
    size = rms * n ** 0.5
    if null >= count:
        g = torch.Generator().manual_seed(seed)
        mix, _ = torch.linalg.qr(torch.randn(null, count, generator=g, dtype=torch.float64))
        u = (vec[:, :null] @ mix).T
    else:
        u = vec[:, :count].T
        pair = max((lam[j] + lam[k]).item() for j in range(count) for k in range(j + 1, count))
        size = min(size, visible * sigma / pair ** 0.5)
    details = size * u.reshape(count, *shape)
    seen = forward(details)
    gaps = [(details[j] - details[k]).norm().item() for j in range(count) for k in range(j + 1, count)]
    leaks = [(seen[j] - seen[k]).norm().item() / sigma for j in range(count) for k in range(j + 1, count)]
    return details, {"null_dims": null, "latent_dims": n, "separation": min(gaps), "visibility_over_sigma": max(leaks),
                     "kind": "null space" if null >= count else "weakest directions"}


def grid_prior(op, image_size, sigma, images=IMAGES, std=0.01, beta=5.0, min_separation=20.0):
    """(prior, info, gram): components μ_(i,k) = encode(x_i) + δ_k (index i·K + k, caption of image k), with the
    hidden details of `hidden_details`, and MᵀM. s = min(std, separation / min_separation), so that details
    the measurement barely hides (blur) are still ≥ min_separation·s apart and "landed in k" is well defined."""
    if image_size > 128:
        raise ConfigError(f"--image_size {image_size}: the benchmark forms MᵀM densely; use at most 128")
    captions = yaml.safe_load((SAMPLES / "captions.yaml").read_text())
    x = torch.cat([load_image(SAMPLES / name, image_size) for name in images]).double()
    base = AnalyticPrior(["base"], means=torch.zeros(1, 4, 1, 1))
    mu = base.encode(x)
    gram, forward, _ = latent_gram(base, op, mu.shape[1:])
    details, info = hidden_details(gram, forward, mu.shape[1:], sigma, len(images))
    means = (mu[:, None] + details[None]).flatten(0, 1)
    std = min(std, info["separation"] / min_separation)
    names = [captions[name] for name in images]
    prior = AnalyticPrior([names[k] for _ in images for k in range(len(images))], means=means, std=std, beta=beta)
    return prior, {**info, "std": std, "separation_over_std": info["separation"] / std, "captions": names,
                   "details": [Path(name).stem for name in images]}, gram


def dense_posterior(prior, op, gram, y, prompt, sigma):
    """treg.posterior.exact_posterior computed with the dense MᵀM instead of CG (its formulas; equal to it, see
    tests): Σ = (I/s² + MᵀM/σ²)⁻¹, m_k = Σ(μ_k/s² + Mᵀy/σ²), and by Woodbury
    (σ²I + s²MMᵀ)⁻¹ = (I − M(σ²/s²·I + MᵀM)⁻¹Mᵀ)/σ² for the weights. CG on blur needs hundreds of iterations."""
    forward, adjoint = linear_map(prior, op)
    y = y.double()
    mu = prior.means(*adjoint(y).shape[-2:]).double()
    s2, n2 = prior.std ** 2, sigma ** 2
    eye = torch.eye(len(gram), dtype=gram.dtype)
    sigma_post = torch.linalg.inv(eye / s2 + gram / n2)
    means = (mu.flatten(1) / s2 + adjoint(y).flatten(1) / n2) @ sigma_post  # Σ is symmetric
    residual = y - forward(mu)
    u = adjoint(residual).flatten(1)
    quad = (residual.flatten(1).pow(2).sum(1) - (u * torch.linalg.solve(n2 / s2 * eye + gram, u.T).T).sum(1)) / n2
    e = prior.embed([prompt]) if isinstance(prompt, str) else prompt
    log_weights = torch.log_softmax(prior.log_weights(e).double()[0] - quad / 2, dim=0)
    return ExactPosterior(means.view_as(mu), log_weights, y, forward, adjoint, prior.std, sigma, 0)


def solver_config(name, setting, args):
    """The solver's YAML config with --steps, --set and the setting's cfg_guidance applied."""
    sets = {k.split(".", 1)[1]: v for k, v in args.set.items() if k.split(".", 1)[0] == name}
    _, cfg = load_solver(ROOT / f"configs/solver/{name}.yaml", SOLVERS, sets)
    if args.steps is not None and hasattr(cfg, "steps"):
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if hasattr(cfg, "cfg_guidance"):
        if setting == "w=0":
            w = 0.0
        else:
            w = args.cfg_guidance if args.cfg_guidance is not None else max(cfg.cfg_guidance, 1.0)
        cfg = dataclasses.replace(cfg, cfg_guidance=w)
    return cfg


def prompts_for(setting, k_true, captions):
    if setting == "w=0":
        return NULL_PROMPT
    return captions[k_true if setting == "true" else (k_true + 1) % len(captions)]


def run_task(task_name, args, bar):
    """Every (setting, solver) of one task: (rows, runs)."""
    task = load_task(ROOT / f"configs/task/{task_name}.yaml", args.image_size)
    op = build_operator(task.operator, task.image_size, **task.params)
    sigma = task.noise_scale
    prior, info, gram = grid_prior(op, task.image_size, sigma)
    captions = info["captions"]
    kk = len(captions)
    h = task.image_size // prior.vae_scale_factor
    mu = prior.means(h, h)

    seeds = list(range(args.seed, args.seed + args.seeds))
    truth = [j % kk for j in range(len(seeds))]  # seed j measures image j mod K with its own detail
    x = prior.decode(torch.stack([mu[t * kk + t] for t in truth])).float()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    y = measure(op, x, sigma, gens)
    after_y = [g.get_state() for g in gens]
    floor = sigma * y[0].numel() ** 0.5
    uc = prior.embed([NULL_PROMPT])

    rows, runs = [], []
    for setting in SETTINGS:
        prompts = [prompts_for(setting, t, captions) for t in truth]
        c = prior.embed(prompts)
        posts = [dense_posterior(prior, op, gram, y[j:j + 1], prompts[j], sigma) for j in range(len(seeds))]
        weights = torch.stack([p.log_weights.exp().float() for p in posts])  # (N, K²)
        if setting == "w=0":
            target = [None] * len(seeds)
        else:  # the component with the prompt's caption that the exact posterior weighs most
            target = [max((i for i, cap in enumerate(prior.captions) if cap == prompts[j]), key=lambda i: weights[j, i])
                      for j in range(len(seeds))]
        for name in args.solvers:
            bar.set_description(f"{task_name} {setting} {name}")
            row = {"task": task_name, "setting": setting, "solver": name}
            try:
                cfg = solver_config(name, setting, args)
                cfg = with_noise(cfg, sigma)  # ΠGDM and DDRM: the noise y really has
                row["cfg_guidance"] = getattr(cfg, "cfg_guidance", None)
                for g, state in zip(gens, after_y):
                    g.set_state(state)
                profiler = Profiler("cpu")
                begin = time.perf_counter()
                x_hat = SOLVERS[name][0](profiler.wrap(prior, PRIOR_PARTS), op, y, cfg, c=c, uc=uc, generator=gens)
                wall = time.perf_counter() - begin
                nfe = profiler.report(wall, len(seeds))["nfe"]
                wall /= len(seeds)
                if not torch.isfinite(x_hat).all():
                    raise FloatingPointError("non-finite solution")
            except Exception as err:  # one failing solver is a table entry, not the end of the benchmark
                first = str(err).splitlines()[0][:120] if str(err) else ""
                rows.append({**row, "error": f"{type(err).__name__}: {first}"})
                bar.update()
                continue
            residual = (residual_norm(op, y, x_hat) / floor).tolist()
            for j in range(len(seeds)):
                k, w = landed_component(prior, x_hat[j:j + 1], posts[j])
                k, w = k.item(), w.item()
                m = posts[j].means[k]
                z = prior.encode(x_hat[j:j + 1]).double()[0]
                runs.append({**row, "seed": seeds[j], "truth": truth[j], "prompt": prompts[j],
                             "residual": residual[j], "landed": k, "landed_caption": prior.captions[k],
                             "posterior_weight": w, "prompted": target[j],
                             "hit": None if target[j] is None else k == target[j],
                             "rel_l2": ((z - m).norm() / m.norm()).item(),
                             "posterior_weights": [round(v, 6) for v in weights[j].tolist()]})
            mine = runs[-len(seeds):]
            detail = dict(zip(captions, info["details"]))  # caption → short name (the image's stem)
            expected = {detail[cap]: sum(weights[j, i].item() for j in range(len(seeds)) for i, cp in
                                         enumerate(prior.captions) if cp == cap) for cap in captions}
            counts = {detail[cap]: sum(r["landed_caption"] == cap and r["posterior_weight"] >= SUPPORT for r in mine)
                      for cap in captions}
            counts["off"] = sum(r["posterior_weight"] < SUPPORT for r in mine)
            row |= {"residual": _mean(r["residual"] for r in mine), "residual_max": max(r["residual"] for r in mine),
                    "prompt_accuracy": None if setting == "w=0" else _mean(r["hit"] for r in mine),
                    "landed": counts, "expected": expected,
                    "posterior_weight": _mean(r["posterior_weight"] for r in mine),
                    "rel_l2": _mean(r["rel_l2"] for r in mine), "nfe": nfe,
                    "seconds": wall, "seeds": len(seeds)}
            rows.append(row)
            bar.update()
    return rows, runs, info | {"noise_scale": sigma, "image_size": task.image_size}


def _mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values)


def markdown(rows, tasks, args):
    """The table, preceded by one line per task describing its prior."""
    lines = [f"Accuracy against the exact posterior: {args.image_size}², {args.seeds} seeds, null prompt "
             f"\"{NULL_PROMPT}\". residual = ‖y − A x̂‖/(σ√m); landed = counts per detail (off = posterior weight "
             f"< {SUPPORT:g}) / what the exact posterior expects. See `python -m treg.bench_accuracy --help`.", ""]
    for name, info in tasks.items():
        lines.append(f"- {name}: {len(info['captions'])}² components, details in the {info['kind']} of A∘decode "
                     f"({info['null_dims']} null dims of {info['latent_dims']}), {info['separation_over_std']:.0f} s "
                     f"apart (s = {info['std']:.3g}), seen in y at ≤ {info['visibility_over_sigma']:.2g} σ")
    lines += ["", "| task | solver | text | w | residual | prompt acc. | landed (vs posterior) | post. weight "
              "| rel. L2 | NFE | s/solve |", "|---" * 11 + "|"]
    fmt = lambda v, f: "–" if v is None else format(v, f)
    for r in rows:
        head = f"| {r['task']} | {r['solver']} | {r['setting']} | {fmt(r.get('cfg_guidance'), 'g')} |"
        if "error" in r:
            lines.append(head + f" error: {r['error'].replace('|', '/')} |" + " |" * 6)
            continue
        landed = " ".join(f"{c} {n}" for c, n in r["landed"].items() if n or c != "off")
        expected = "/".join(f"{v:.1f}" for v in r["expected"].values())
        lines.append(head + f" {r['residual']:.2f} (max {r['residual_max']:.2f}) | "
                     f"{fmt(r['prompt_accuracy'], '.0%')} | {landed} / {expected} | {r['posterior_weight']:.3f} | "
                     f"{r['rel_l2']:.4f} | {r['nfe']:.0f} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def parse_set(text):
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"--set expects SOLVER.KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated configs/task names (default: %(default)s)")
    p.add_argument("--solvers", default=None, help="comma-separated solvers (default: every entry of SOLVERS)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per (task, setting) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=64, help="image side, at most 128 (default: %(default)s)")
    p.add_argument("--steps", type=int, help="override every solver's steps (default: the YAMLs')")
    p.add_argument("--cfg_guidance", type=float, help="w of the text settings (default: each YAML's, at least 1)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="SOLVER.KEY=VALUE",
                   help="override a solver YAML field, e.g. treg.use_AN=true (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; the tensors are tiny (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("assets/accuracy"), help="writes OUT.md, OUT.json "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    args.set = dict(args.set)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.solvers = list(SOLVERS) if args.solvers is None else [s.strip() for s in args.solvers.split(",") if s.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        unknown = [s for s in args.solvers if s not in SOLVERS]
        if unknown or not args.solvers:
            raise ConfigError(f"--solvers: unknown {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(SOLVERS)}")
        missing = [t for t in args.tasks if not (ROOT / f"configs/task/{t}.yaml").exists()]
        if missing or not args.tasks:
            raise ConfigError(f"--tasks: no configs/task/<name>.yaml for {', '.join(missing) or '(none given)'}")
        if args.seeds < 1:
            raise ConfigError("--seeds must be at least 1")
        unused = [k for k in args.set if k.split(".")[0] not in args.solvers]
        if unused:
            raise ConfigError(f"--set {', '.join(unused)}: not a selected solver")
        for name in args.solvers:
            solver_config(name, "true", args)  # a misspelt --set key fails here, before any work
        torch.set_num_threads(args.threads)
        rows, runs, tasks = [], [], {}
        begin = time.perf_counter()
        with tqdm(total=len(args.tasks) * len(SETTINGS) * len(args.solvers), file=sys.stderr, unit="solve") as bar:
            for name in args.tasks:
                r, s, info = run_task(name, args, bar)
                rows += r
                runs += s
                tasks[name] = info
    except ConfigError as err:
        sys.exit(f"error: {err}")
    table = markdown(rows, tasks, args)
    settings = cli_args(args)
    report = {"settings": settings | {"null_prompt": NULL_PROMPT, "images": list(IMAGES),
                                      "seconds": time.perf_counter() - begin},
              "tasks": tasks, "rows": rows, "runs": runs}
    write_report(args.out, table + "\n", report)
    print(table)


if __name__ == "__main__":
    main()
