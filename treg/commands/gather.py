r"""Gather a sweep: every run.json under ROOT (one solve.py --workdir per setting) into one table, sheet and plot.

A sweep is a shell loop over solve.py, one workdir per setting; then gather them:

    for w in 0 2.5 5; do for lr in 5e-4 1e-3; do
      python solve.py --model analytic --task_config configs/task/super-resolution.yaml --img_path samples \
        --null_prompt "out of focus, depth of field" --prompt "a photo of a cat" --cfg_guidance $w --null_lr $lr \
        --use_AN --workdir runs/sweep/w${w}_lr${lr}
    done; done
    python -m treg gather runs/sweep

Writes into --out (default ROOT): summary.md and summary.csv (one row per run and method: the run folder, the method,
the settings that differ across runs, then the metric means, and FID/KID of the run's reconstructions against its
ground truths where pytorch-fid and its Inception weights are present, see treg/fid.py), sheet.png (ground truth,
then the reconstructions of each run and method, one column per image) and plot.png (--metric against --x, one line
per --lines value and per value of any other varying setting; skipped with a note when matplotlib is missing or --x
does not vary).
"""
import argparse
import csv
import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from treg.config import ConfigError

ARG_SETTINGS = ("task_config", "model", "prompt", "null_prompt", "seed", "img_path")  # CLI args that are settings
TASK_SETTINGS = ("image_size", "noise_scale")  # resolved task fields that are settings
METRIC_ORDER = ("residual", "noise_floor", "psnr", "ssim", "clip", "fid", "kid", "wall_seconds", "nfe",
                "peak_memory_mb", "images")
SHORT = {"cfg_guidance": "w", "task_config": "task"}  # names in sheet and plot labels
THUMB, PAD = 128, 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m treg gather", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="folder searched recursively for run.json files")
    p.add_argument("--out", type=Path, help="output folder (default: ROOT)")
    p.add_argument("--metric", help="metric for plot.png (default: psnr if present, else residual)")
    p.add_argument("--x", default="cfg_guidance", help="setting on the plot's x axis (default: %(default)s)")
    p.add_argument("--lines", default="null_lr", help="setting with one plot line per value (default: %(default)s)")
    p.add_argument("--no_fid", action="store_true",
                   help="skip FID/KID even where pytorch-fid and its weights are present")
    p.add_argument("--device", help="torch device of FID's Inception network (default: the accelerator, else cpu)")
    return p.parse_args(argv)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def order(value):
    """A sort key that orders None < numbers (numerically) < strings."""
    if value is None:
        return (0, 0.0, "")
    return (1, float(value), "") if isinstance(value, (int, float)) else (2, 0.0, str(value))


def locate(path, folder, workdir):
    """A recorded file, re-rooted at the run folder (the run may have moved, or been solved from another cwd)."""
    path = Path(path or "")
    moved = folder / path.relative_to(workdir) if path.is_relative_to(workdir) else path
    return next((p for p in (moved, path) if path.name and p.is_file()), None)


def load_rows(root):
    """One row per (run, method) of every readable run.json under root, plus the ground truth {index: path}."""
    rows, labels, names = [], {}, {}
    for path in sorted(root.rglob("run.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"warning: skipping {path}: {err}", file=sys.stderr)
            continue
        args, task, folder = run.get("args", {}), run.get("task", {}), path.parent
        common = {k: args[k] for k in ARG_SETTINGS if k in args} | {k: task[k] for k in TASK_SETTINGS if k in task}
        if common.get("task_config"):
            common["task_config"] = Path(common["task_config"]).stem
        workdir = args.get("workdir", folder)
        images = run.get("images", [])
        for rec in images:
            labels[rec["index"]] = labels.get(rec["index"]) or locate(rec["files"].get("label"), folder, workdir)
            names.setdefault(rec["index"], Path(rec.get("path", str(rec["index"]))).stem)
        for method, cfg in run.get("solvers", {}).items():
            recon = {r["index"]: locate(r["files"].get(f"recon/{method}"), folder, workdir) for r in images}
            rows.append({"run": folder.relative_to(root).as_posix() if folder != root else root.resolve().name,
                         "method": method, "settings": {**cfg, **common},
                         "metrics": dict(run.get("metrics_mean", {}).get(method, {})), "recon": recon,
                         "style": args.get("metrics_style", "ours")})
    return rows, {i: p for i, p in labels.items() if p}, names


def add_set_metrics(rows, labels, extractor):
    """FID and KID of each row's reconstructions against the ground truths of the same images (≥ 2 pairs)."""
    for r in rows:
        pairs = [(r["recon"][i], labels[i]) for i in sorted(r["recon"]) if r["recon"][i] and i in labels]
        if len(pairs) >= 2:
            from treg import fid
            r["metrics"] |= fid.set_metrics(*zip(*pairs), extractor, style=r["style"])


def split(rows):
    """(varying, shared): settings with different values across the rows that have them (a field that only some
    methods have is not a difference), in first-seen order; and {setting: value} for the others."""
    seen = {}
    for r in rows:
        for k, v in r["settings"].items():
            seen.setdefault(k, {}).setdefault(repr(v), v)
    return [k for k, vs in seen.items() if len(vs) > 1], {k: next(iter(vs.values())) for k, vs in seen.items()
                                                           if len(vs) == 1}


def label(row, keys, with_method, sep="\n"):
    from treg.runs import fmt
    parts = [row["method"]] * with_method + [f"{SHORT.get(k, k)}={fmt(row['settings'].get(k))[:40]}" for k in keys]
    return sep.join(parts)


def contact_sheet(rows, keys, labels, names, with_method):
    """Rows: ground truth (if any), then one per (run, method); columns: image indices; labels on the left."""
    indices = sorted({i for r in rows for i in r["recon"]} | set(labels))
    lines = [("ground truth", labels)] * bool(labels)
    lines += [(label(r, keys, with_method) or r["run"], r["recon"]) for r in rows]
    font = ImageFont.load_default(size=13)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = lambda text: draw.multiline_textbbox((0, 0), text, font=font, spacing=2)[2:]
    with Image.open(next(p for _, cells in lines for p in cells.values() if p)) as first:
        t = min(THUMB, max(first.size))
    left = max(box(text)[0] for text, _ in lines) + 2 * PAD
    top = max(box(names.get(i, str(i)))[1] for i in indices) + 2 * PAD
    heights = [max(t, box(text)[1]) + PAD for text, _ in lines]
    sheet = Image.new("RGB", (left + len(indices) * (t + PAD), top + sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, i in enumerate(indices):
        draw.text((left + j * (t + PAD), PAD), names.get(i, str(i))[: t // 7], fill="black", font=font)
    y = top
    for (text, cells), h in zip(lines, heights):
        draw.multiline_text((PAD, y), text, fill="black", font=font, spacing=2)
        for j, i in enumerate(indices):
            if cells.get(i):
                with Image.open(cells[i]) as img:
                    thumb = img.convert("RGB")
                    thumb.thumbnail((t, t), Image.LANCZOS)
                sheet.paste(thumb, (left + j * (t + PAD), y))
        y += h
    return sheet


def plot(rows, metric, x, lines, keys, with_method, path):
    """metric vs x, one line per value of `lines` (and of any other varying setting), written to path."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return print("note: plot.png skipped: matplotlib is not installed", file=sys.stderr)
    if x not in keys:
        where = "is not a setting of" if all(x not in r["settings"] for r in rows) else "does not vary across"
        return print(f"note: plot.png skipped: --x {x} {where} the runs", file=sys.stderr)
    if all(lines not in r["settings"] for r in rows):
        print(f"note: --lines {lines} is not a setting of the runs; plotting without it", file=sys.stderr)
    rest = [lines] * (lines in keys) + [k for k in keys if k not in (x, lines)]
    groups = {}
    for r in rows:
        groups.setdefault(label(r, rest, with_method, sep=" "), []).append(r)
    values = sorted({r["settings"][x] for r in rows if r["settings"].get(x) is not None}, key=order)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    pos = (lambda v: v) if numeric else {v: n for n, v in enumerate(values)}.get
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for n, (name, group) in enumerate(groups.items()):  # styles differ, so lines that coincide stay visible
        pts = sorted((pos(r["settings"][x]), r["metrics"][metric]) for r in group
                     if r["settings"].get(x) is not None and r["metrics"].get(metric) is not None)
        ax.plot([p for p, _ in pts], [m for _, m in pts], marker="os^Dv"[n % 5], ls=["-", "--", ":", "-."][n % 4],
                ms=7 - n % 3, label=name or None)
    from treg.images import atomic_write
    from treg.runs import fmt
    if not numeric:
        ax.set_xticks(range(len(values)), [fmt(v) for v in values])
    ax.set(xlabel=x, ylabel=f"{metric} (mean over images)",
           title=f"{metric} vs {x}" + f", by {lines}" * (lines in keys))
    ax.grid(alpha=0.3)
    if any(groups):
        ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def main(argv=None):
    args = parse_args(argv)
    # torch (through every module below) loads only after the arguments parse, so that --help answers at once
    from treg import fid, hub
    from treg.images import atomic_write
    from treg.metrics import MetricUnavailable
    from treg.runs import fmt, markdown, write_text
    if not args.root.is_dir():
        fail(f"{args.root} is not a folder")
    try:
        device = hub.resolve_device(args.device)
    except ConfigError as err:
        fail(err)
    rows, labels, names = load_rows(args.root)
    if not rows:
        fail(f"no run.json under {args.root} (run solve.py with --workdir {args.root}/NAME first)")
    if not args.no_fid:
        try:
            add_set_metrics(rows, labels, fid.load_inception(device))
        except MetricUnavailable as err:
            print(f"note: FID/KID skipped: {err}", file=sys.stderr)
    found = {k for r in rows for k in r["metrics"]}
    metrics = sorted(found, key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER else 3.5, k))
    metric = args.metric or ("psnr" if "psnr" in found else "residual")
    if metric not in found:
        fail(f"no metric {metric} in the runs; they have {', '.join(metrics)}")
    keys, shared = split(rows)
    rows.sort(key=lambda r: [order(r["settings"].get(k)) for k in keys] + [r["run"], r["method"]])
    header = ["run", "method", *keys, *metrics]
    body = [[r["run"], r["method"], *(r["settings"].get(k) for k in keys), *(r["metrics"].get(m) for m in metrics)]
            for r in rows]
    table = markdown(header, body)
    out = args.out or args.root
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(
        f"# Sweep {args.root}\n\nShared by all runs: {', '.join(f'{k}={fmt(v)}' for k, v in shared.items())}"
        f"\n\n{table}\n"))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *([("" if v is None else v) for v in b] for b in body)])
    write_text(out / "summary.csv", buffer.getvalue())
    with_method = len({r["method"] for r in rows}) > 1
    if any(p for r in rows for p in r["recon"].values()):
        sheet = contact_sheet(rows, keys, labels, names, with_method)
        atomic_write(out / "sheet.png", lambda tmp: sheet.save(tmp, format="PNG"))
    else:
        print("note: sheet.png skipped: no reconstruction images found", file=sys.stderr)
    plot(rows, metric, args.x, args.lines, keys, with_method, out / "plot.png")
    print(table)


if __name__ == "__main__":
    main()
