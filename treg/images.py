"""Image files in and out. Inside the library images are (B,3,H,W) float32 in [-1,1]; only this module and
metrics.py convert to [0,1] or uint8, always with one fixed mapping (no per-image min-max stretch)."""
import hashlib
import os
import secrets
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class ImageError(ValueError):
    """An input image problem, reported to the user as one line."""


def _to_rgb(img):
    """Any PIL mode (grey, 16-bit grey, palette, RGBA, CMYK) as 8-bit RGB; transparency goes on white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def _open(path, draft=None):
    """(size in the file, the decoded image) at `path`, or ImageError as one line. With `draft`, a JPEG is decoded
    at the smallest of 1/2, 1/4 or 1/8 scale that keeps both sides ≥ draft: every byte of it is still read."""
    try:
        with Image.open(path) as img:
            size = img.size
            if draft is not None:
                img.draft("RGB", (draft, draft))
            img.load()
            return size, _to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise ImageError(f"{path} is a folder inside the image folder, not an image") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"refusing {path}: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # PIL's decoders raise all of these
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None


def check_image(path, size):
    """((width, height), SHA-256 of the file) of an image that decodes completely, or ImageError as one line.

    A folder is checked with this before its first solve: a header can be intact where the data is not (a truncated
    JPEG), so the image is decoded, at reduced scale where the format allows (JPEG, to `size`). Measured on 100
    JPEGs, 2-core CPU: 0.4 s at 512², 4 s at 2048² (18 s decoded at full scale)."""
    (width, height), _ = _open(path, draft=size)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return (width, height), digest.hexdigest()


def load_image(path, size):
    """(1,3,size,size) in [-1,1]: RGB, shorter side resized to `size` (bilinear, so a smaller image is upsampled),
    centre-cropped."""
    _, img = _open(path)
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)
    return x.permute(2, 0, 1)[None]


def list_images(path):
    """The image files at `path` (one file, or a folder's images in sorted order)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise ImageError(f"no images ({', '.join(sorted(EXTENSIONS))}) in folder {path}")
        return files
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    return [path]


def to_uint8(x):
    """(3,H,W) in [-1,1] -> (H,W,3) uint8 by the fixed map (x+1)/2·255, clamped."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def viewable(y, size):
    """A measurement shown as a person would look at it: image-layout y nearest-upsampled to size×size."""
    return y if y.shape[-1] == size else F.interpolate(y, size=(size, size), mode="nearest")


def atomic_write(path, write):
    """Call write(tmp_path) and rename into place, so a crash or Ctrl-C never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique sibling name rather than mkstemp, whose 0600 mode would carry over to the result
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # name the file the user asked for, not the temporary one
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise


def save_image(x, path):
    """Write a (3,H,W) [-1,1] tensor as an 8-bit PNG, atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(to_uint8(x)).save(tmp, format="PNG"))


def grid(rows, labels=None, pad=4, font_size=None):
    """A PIL image tiling `rows` (a list of lists of (3,H,W) tensors of one size) with optional column labels.

    By default labels use PIL's small bitmap font, cut to the tile width; with `font_size` they use a scalable font
    of that size and may span several lines ("\n"), the label band growing to fit.
    """
    from PIL import ImageDraw, ImageFont

    h, w = rows[0][0].shape[-2:]
    font = None if font_size is None else ImageFont.load_default(size=font_size)
    if not labels:
        top = 0
    elif font is None:
        top = 16
    else:
        top = max(str(label).count("\n") + 1 for label in labels) * round(1.25 * font_size) + pad
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(labels or []):
        text = str(label)[: max(4, w // 6)] if font is None else str(label)
        spacing = 4 if font is None else round(0.25 * font_size)
        draw.text((pad + j * (w + pad), 2), text, fill="black", font=font, spacing=spacing)
    for i, row in enumerate(rows):
        for j, x in enumerate(row):
            sheet.paste(Image.fromarray(to_uint8(x)), (pad + j * (w + pad), top + pad + i * (h + pad)))
    return sheet
