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

    python -m treg bench accuracy                                  # 4 tasks × 3 settings × 5 seeds × every solver
    python -m treg bench accuracy --solvers treg,ddim --tasks super-resolution-x8 --seeds 10 \\
        --set treg.use_AN=true --set treg.null_lr=1e-3 --cfg_guidance 5      # TReg with the README flags

Writes OUT.md and OUT.json (default runs/accuracy; `--out assets/accuracy` refreshes the committed report) and
prints the table. Offline: the analytic prior only.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from treg.bench.beds import ACCURACY_SUPPORT, IMAGES, NULL_PROMPT, SETTINGS, accuracy_config, accuracy_task
from treg.config import CONFIGS, ConfigError, parse_set
from treg.runs import cli_args, write_report
from treg.solvers import SOLVERS

TASKS = ("super-resolution", "gauss-deblur", "motion-deblur", "inpainting")
def markdown(rows, tasks, args):
    """The table, preceded by one line per task describing its prior."""
    lines = [f"Accuracy against the exact posterior: {args.image_size}², {args.seeds} seeds, null prompt "
             f"\"{NULL_PROMPT}\". residual = ‖y − A x̂‖/(σ√m); landed = counts per detail (off = posterior weight "
             f"< {ACCURACY_SUPPORT:g}) / what the exact posterior expects. "
             "See `python -m treg bench accuracy --help`.", ""]
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m treg bench accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="writes OUT.md, OUT.json "
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
        missing = [t for t in args.tasks if not (CONFIGS / f"task/{t}.yaml").exists()]
        if missing or not args.tasks:
            raise ConfigError(f"--tasks: no configs/task/<name>.yaml for {', '.join(missing) or '(none given)'}")
        if args.seeds < 1:
            raise ConfigError("--seeds must be at least 1")
        unused = [k for k in args.set if k.split(".")[0] not in args.solvers]
        if unused:
            raise ConfigError(f"--set {', '.join(unused)}: not a selected solver")
        for name in args.solvers:
            accuracy_config(name, "true", args)  # a misspelt --set key fails here, before any work
        torch.set_num_threads(args.threads)
        rows, runs, tasks = [], [], {}
        begin = time.perf_counter()
        with tqdm(total=len(args.tasks) * len(SETTINGS) * len(args.solvers), file=sys.stderr, unit="solve") as bar:
            for name in args.tasks:
                r, s, info = accuracy_task(name, args, bar)
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
