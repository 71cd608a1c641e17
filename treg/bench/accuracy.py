"""Accuracy benchmark against the exact posterior: does each solver fit y, and does the prompt choose the solution?
The bed, the text settings, the columns and the flags are described with its command line, `accuracy` in
treg/bench/flags.py (`python -m treg bench accuracy --help`); main(argv) is run(flags.accuracy(argv)).
"""
import sys
import time

import torch
from tqdm import tqdm

from treg.bench import flags
from treg.bench.beds import ACCURACY_SUPPORT, IMAGES, NULL_PROMPT, SETTINGS, accuracy_config, accuracy_task
from treg.config import CONFIGS, ConfigError
from treg.runs import cli_args, write_report
from treg.solvers import SOLVERS


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


def run(args):
    """The benchmark for flags.accuracy's arguments: writes the report and prints the table."""
    if args.solvers is None:
        args.solvers = list(SOLVERS)
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


def main(argv=None):
    run(flags.accuracy(argv))


if __name__ == "__main__":
    main()
