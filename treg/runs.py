"""Run folders. Each solved image leaves one JSON record (written last, atomically, so it also marks the image as
complete); records are merged into run.json (settings, per-image results, metric means) and metrics.csv.
Several processes can write records side by side; one merges them at the end."""
import csv
import errno
import io
import json
import math
import os
import re
import unicodedata
import warnings
from pathlib import Path

from treg.config import ConfigError
from treg.images import atomic_write, save_image

RECORDS = "records"
OUTPUT_FOLDERS = ("input", "label", "recon", "ypred", "compare")  # the PNGs of solve.py, recon/ypred per method
REPORTS = ("run.json", "metrics.csv", "compare.md")
COLUMNS = ("index", "path", "method", "residual", "noise_floor", "wall_seconds", "nfe", "peak_memory_mb")


def write_json(path, data):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_report(out, text, data):
    """A benchmark's OUT.md (text) and OUT.json (data), each written atomically, OUT's folder created; OUT is a path
    prefix ("assets/fast"), so a dot in its name stays part of the name."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(f"{out}.md"), text)
    write_json(Path(f"{out}.json"), data)


def mean_interval(values):
    """(mean, half-width of its 95% Student-t interval; 0 for one value)."""
    from scipy import stats
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def cli_args(args):
    """A CLI's parsed arguments as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def record_path(workdir, index):
    return Path(workdir) / RECORDS / f"{index:05d}.json"


def _is_record(data):
    """A record as solve.py writes it: an index, and per method a result with a residual and metrics."""
    return (isinstance(data, dict) and isinstance(data.get("index"), int) and isinstance(data.get("path"), str)
            and isinstance(data.get("results"), dict) and all(
                isinstance(r, dict) and isinstance(r.get("metrics"), dict)
                and all(k in r for k in ("residual", "noise_floor", "wall_seconds", "nfe", "peak_memory_mb"))
                for r in data["results"].values()))


def read_records(workdir, warn=True):
    """The image records in `workdir`, by index; a file there that is not one (corrupt, foreign, unreadable) is
    skipped, with a warning if `warn`, so a stray file never breaks the merge."""
    records = []
    for path in sorted((Path(workdir) / RECORDS).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if _is_record(data):
            records.append(data)
        elif warn:
            warnings.warn(f"skipping {path}: not a record written by solve.py")
    return records


def _differences(old, new, key=""):
    """['key old → new', ...] for the values where two settings mappings differ (a set of methods as one)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if key and old.keys() != new.keys() and all(isinstance(v, dict) for v in [*old.values(), *new.values()]):
            return [f"{key} {','.join(old) or '–'} → {','.join(new) or '–'}"]
        return [d for k in dict.fromkeys([*old, *new]) for d in _differences(old.get(k), new.get(k), k)]
    return [] if old == new else [f"{key} {'–' if old is None else repr(old)} → {'–' if new is None else repr(new)}"]


def stored_settings(workdir):
    """[(file, settings)] of run.json and of each record in `workdir`: what its outputs were made with (None where
    a file records no settings, e.g. one written before solve.py stored them)."""
    workdir = Path(workdir)
    out = []
    if (workdir / "run.json").exists():
        try:
            data = json.loads((workdir / "run.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        out.append(("run.json", data.get("settings") if isinstance(data, dict) else None))
    return out + [(str(record_path(".", r["index"])), r.get("settings")) for r in read_records(workdir, warn=False)]


def settings_conflict(workdir, settings, expected):
    """None if everything solve.py left in `workdir` was made with `settings`, else one line saying what differs.
    `expected(index)` gives the output files (relative to `workdir`) that these settings write for image `index`; a
    PNG of an output folder that is not one of those of the index its name starts with belongs to another run."""
    workdir = Path(workdir)
    for where, old in stored_settings(workdir):
        if old is None:
            return f"{where} records no settings (written by an older solve.py, or not by solve.py)"
        if old != settings:
            changes = _differences(old, settings)
            return f"its {where} was made with other settings: " + "; ".join(changes[:4]) + (
                f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    for folder in OUTPUT_FOLDERS:
        for path in sorted((workdir / folder).rglob("[!.]*.png")):
            index = path.name[:5]
            if not (index.isdigit() and path.relative_to(workdir) in expected(int(index))):
                return f"{path.relative_to(workdir)} is no output of these settings (left by another run)"
    return None


def clear_outputs(workdir):
    """Remove what solve.py wrote in `workdir` (reports, records, the PNGs of the output folders, temporary files
    of interrupted writes) and the folders this empties; anything else stays. Returns the number of files removed."""
    workdir = Path(workdir)
    files = [workdir / name for name in REPORTS if (workdir / name).is_file()]
    files += [p for p in (workdir / RECORDS).glob("*.json") if p.is_file()]  # pathlib's * matches .tmp names
    for folder in OUTPUT_FOLDERS:
        files += [p for p in (workdir / folder).rglob("*.png") if p.is_file()]
    for path in files:
        path.unlink()
    for folder in (*OUTPUT_FOLDERS, RECORDS):
        for sub in sorted((p for p in (workdir / folder).rglob("*") if p.is_dir()), reverse=True):
            _remove_if_empty(sub)
        _remove_if_empty(workdir / folder)
    return len(files)


def _remove_if_empty(folder):
    try:
        folder.rmdir()
    except OSError:  # not empty (a file that is not ours), or absent
        pass


def _mean(values):
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def rows(records):
    """One flat dict per (image, method): the columns of metrics.csv."""
    out = []
    for record in records:
        for method, result in record["results"].items():
            row = {"index": record["index"], "path": record["path"], "method": method,
                   "residual": result["residual"], "noise_floor": result["noise_floor"],
                   "wall_seconds": result["wall_seconds"], "nfe": result["nfe"],
                   "peak_memory_mb": result["peak_memory_mb"]}
            out.append({**row, **result["metrics"]})
    return out


def means(table):
    """{method: {column: mean over images}} for every numeric column."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in table):
        mine = [r for r in table if r["method"] == method]
        keys = [k for k in mine[0] if k not in ("index", "path", "method")]
        out[method] = {k: _mean([r.get(k) for r in mine]) for k in keys}
        out[method]["images"] = len(mine)
    return out


def merge(workdir, header):
    """Write run.json (header + records + means) and metrics.csv from the records in `workdir`; return the means,
    or None (writing nothing) when there is no record."""
    workdir = Path(workdir)
    records = read_records(workdir)
    if not records:
        return None
    table = rows(records)
    summary = means(table) if table else {}
    write_json(workdir / "run.json", {**header, "images": records, "metrics_mean": summary})
    columns = list(COLUMNS) + sorted({k for r in table for k in r} - set(COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    write_text(workdir / "metrics.csv", buffer.getvalue())
    return summary


def fmt(value, digits=4):
    """A table cell: '–' for None, `digits` significant digits for floats."""
    return "–" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(header, body):
    """A markdown table from a header row and body rows of values."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |" for row in body])


def markdown_table(summary, columns):
    """A markdown table with one row per method and the given mean columns."""
    return markdown(["method", *columns], [[m, *(s.get(c) for c in columns)] for m, s in summary.items()])


# ---------------------------------------------------------------- the files of one solved image (solve.py)
def check_workdir(path):
    """ConfigError unless `path` is, or can be made, a writable folder. Creates nothing."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise ConfigError(f"--workdir: the name {part[:40]}... is too long for the file system")
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(f"--workdir {path}: {probe} is a symlink to a missing target")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--workdir {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {path}: {probe} is not writable")


def slug(prompt, limit=80):
    """A file-name-safe form of the prompt: ASCII, no path separators or leading dots, at most `limit` chars."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9 ,_+-]+", "_", text).strip(" _")
    return text[:limit].rstrip(" _") or "no-prompt"


def output_files(workdir, index, name, methods, compare):
    """{(kind, method): path} for one image; kind is input, label, recon, ypred or compare."""
    stem = f"{index:05d}-{name}.png"
    files = {("input", None): workdir / "input" / stem, ("label", None): workdir / "label" / stem}
    for m in methods:
        sub = Path(m) if compare else Path()
        files[("recon", m)] = workdir / "recon" / sub / stem
        files[("ypred", m)] = workdir / "ypred" / sub / stem
    if compare:
        files[("compare", None)] = workdir / "compare" / stem
    return files


def write_outputs(files, pictures, record_path, record):
    """Write one image's PNGs ({key: tensor or PIL image}), then its record, which marks it complete. If any write
    fails, the files already written for it are removed: an image is complete or absent, never half-written."""
    for path in [*files.values(), record_path]:
        if path.is_dir():
            raise OSError(errno.EISDIR, "a folder is in the way of an output file", str(path))
    written = []
    try:
        for key, path in files.items():
            picture = pictures[key]
            if hasattr(picture, "save"):  # a PIL image (the compare strip); else an image tensor
                atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
            else:
                save_image(picture, path)
            written.append(path)
        write_json(record_path, record)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # only if this image's file was all it held
            except OSError:
                pass
        raise
