r"""A figure from solve.py runs of one image: measurement | one reconstruction per run | ground truth.

Each RUN_DIR is a solve.py workdir (input/, label/, recon/, run.json); the figure shows its image 0, labelled by the
run's prompt and guidance weight w (run.json: args.prompt and the solver's cfg_guidance). The runs must share the
measured image. assets/demo.png is made offline, on the analytic prior (SR ×16 of samples/cat_1.jpg at 512², the
official README flags; 10 s to 1 min per run on a 2-core CPU), by:

    for run in "w0|0|" "cat|5.0|a photo of a cat" "coffee|5.0|a cup of coffee"; do
        IFS="|" read -r name w prompt <<< "$run"
        python solve.py --model analytic --task_config configs/task/super-resolution.yaml --img_path samples/cat_1.jpg \
            --null_prompt "out of focus, depth of field" --prompt "$prompt" --cfg_guidance "$w" --null_lr 1e-3 \
            --use_AN --workdir "workdir/demo/$name"
    done
    python -m treg figure workdir/demo/w0 workdir/demo/cat workdir/demo/coffee --out assets/demo.png
"""
import argparse
import json
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageFont


class RunError(ValueError):
    """A run folder that cannot be used; the message is one line."""


def _image0(run, kind):
    """The PNG of image 0 in run/kind/ (or run/kind/<method>/ for a --compare run with one method)."""
    files = sorted((run / kind).glob("00000-*.png")) or sorted((run / kind).glob("*/00000-*.png"))
    if not files:
        raise RunError(f"{run}: expected one {kind}/00000-*.png, found none")
    if len(files) > 1:  # solve.py now refuses a second run into a workdir; an older one could mix two
        names = ", ".join(str(f.relative_to(run)) for f in files)
        raise RunError(f"{run}: expected one {kind}/00000-*.png, found {len(files)} ({names}): several methods, or "
                       "the images of an earlier run (rerun that one with solve.py --overwrite)")
    return files[0]


def read_run(run):
    """{'prompt', 'w', 'input', 'label', 'recon'} of a solve.py workdir; w is None if the solver has no guidance."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run}: not a folder")
    try:
        meta = json.loads((run / "run.json").read_text())
        prompt = meta["args"]["prompt"]
        solvers = meta["solvers"]
    except OSError:
        raise RunError(f"{run}: no run.json (not a finished solve.py workdir)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise RunError(f"{run}: run.json is not a solve.py record ({type(err).__name__}: {err})") from None
    if len(solvers) != 1:
        raise RunError(f"{run}: the figure takes single-solver runs, this one has {', '.join(solvers)}")
    w = next(iter(solvers.values())).get("cfg_guidance")
    return {"prompt": prompt, "w": w, **{kind: _image0(run, kind) for kind in ("input", "label", "recon")}}


def label(prompt, w):
    """'w=0 (no text)' or '"prompt" (w=5)'."""
    if w == 0:
        return "w=0 (no text)"
    return f'"{prompt}"' + ("" if w is None else f" (w={w:g})")


def wrap(text, font, width):
    """`text` on as many lines as it needs to fit `width` pixels in `font`."""
    for chars in range(max(len(text), 1), 0, -1):
        lines = textwrap.wrap(text, chars) or [""]
        if max(font.getlength(line) for line in lines) <= width:
            return "\n".join(lines)
    return text


def figure(runs, size=256, font_size=18):
    """The PIL figure for a list of run folders; tiles resized to size × size."""
    import numpy as np  # torch (through treg.images too) loads only to draw, so that --help answers at once
    import torch

    from treg.images import grid
    if not runs:
        raise RunError("no run folders given")
    info = [read_run(r) for r in runs]

    def load(path):
        """(3, size, size) in [-1, 1]; solve.py's PNGs are square, so a plain resize."""
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as err:
            raise RunError(f"cannot read {path}: {err}") from None
        if img.size != (size, size):
            img = img.resize((size, size), Image.LANCZOS)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

    truth = load(info[0]["label"])
    for r, i in zip(runs[1:], info[1:]):
        if not torch.equal(load(i["label"]), truth):
            raise RunError(f"{r}: its ground truth differs from {runs[0]}'s: the runs must solve the same image")
    font = ImageFont.load_default(size=font_size)
    labels = ["measurement", *(label(i["prompt"], i["w"]) for i in info), "ground truth"]
    labels = [wrap(text, font, size) for text in labels]
    return grid([[load(info[0]["input"]), *(load(i["recon"]) for i in info), truth]], labels, font_size=font_size)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m treg figure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="solve.py workdirs, one column each")
    p.add_argument("--out", type=Path, default=Path("runs/demo.png"), help="output PNG (default: %(default)s)")
    p.add_argument("--size", type=int, default=256, help="tile side in pixels (default: %(default)s)")
    p.add_argument("--font_size", type=int, default=18, help="label font size (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        sheet = figure(args.runs, args.size, args.font_size)
    except RunError as err:
        sys.exit(f"error: {err}")
    from treg.images import atomic_write
    atomic_write(args.out, lambda tmp: sheet.save(tmp, format="PNG"))
    print(f"{args.out}: {sheet.width}x{sheet.height}", file=sys.stderr)


if __name__ == "__main__":
    main()
