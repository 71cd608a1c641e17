"""The official CLI's datasets (`--use_dataloader --dataset KEY --root DIR [--target CLASS]`) as lists of image
files, which solve.py then loads and preprocesses like any folder (shorter side resized to image_size, centre crop).

- `food`: Food-101 in its standard layout, DIR/images/<class>/<id>.jpg with DIR/meta/test.json (or test.txt); DIR
  may also be the folder that holds `food-101/`, as torchvision's `Food101(root)` expects. The test split in the
  order of the meta file, which is the order torchvision's Food101 (what the official loader wraps) yields; `--target`
  keeps one class and accepts its key (`ice_cream`) or its name (`ice cream`, `Ice cream`).
- `ffhq`, `afhq`, `landscape`, `imagenet1k`: every image under DIR, recursively, in sorted path order (for
  imagenet1k's DIR/<class>/<file> layout that is ImageFolder's order). The official ffhq/landscape loaders resize
  the shorter side without a crop, which equals ours on their square images and breaks the 512² operators on others.
- `imagenet1k_i2sb`, `imagenet_pair`: not supported; the official loaders cannot run (a missing class list; a
  leftover debugger breakpoint), so there is no behaviour to reproduce.
"""
import difflib
import json
from pathlib import Path

from treg.config import ConfigError
from treg.images import EXTENSIONS, ImageError, list_images

FOLDER_DATASETS = ("ffhq", "afhq", "landscape", "imagenet1k")
UNSUPPORTED = {
    "imagenet1k_i2sb": "its official loader reads exp/data_category/imagenet_val.txt, which the official code "
                       "does not ship",
    "imagenet_pair": "its official loader stops in a leftover debugger breakpoint",
}
DATASETS = ("food", *FOLDER_DATASETS, *UNSUPPORTED)


def class_key(name):
    """'Ice cream', 'ice cream' and 'ice_cream' all name the Food-101 class 'ice_cream'."""
    return "_".join(name.lower().split())


def food101_root(root):
    """The folder holding images/ and meta/: `root` itself or `root`/food-101 (torchvision's layout)."""
    for folder in (Path(root), Path(root) / "food-101"):
        if (folder / "images").is_dir() and (folder / "meta").is_dir():
            return folder
    raise ImageError(f"{root} is not a Food-101 folder: expected images/<class>/<id>.jpg and meta/test.json "
                     f"(or meta/test.txt) in it or in {Path(root) / 'food-101'}")


def food101_split(folder, split="test"):
    """{class: [relative ids 'class/id', in the meta file's order]} of a Food-101 split."""
    meta = folder / "meta"
    if (meta / f"{split}.json").is_file():
        try:
            data = json.loads((meta / f"{split}.json").read_text())
        except ValueError as err:
            raise ImageError(f"cannot read {meta / f'{split}.json'}: {err}") from None
        if not isinstance(data, dict):
            raise ImageError(f"{meta / f'{split}.json'} must map each class to its image ids")
        return data
    if (meta / f"{split}.txt").is_file():
        split_ids = {}
        for line in (meta / f"{split}.txt").read_text().split():
            split_ids.setdefault(line.split("/")[0], []).append(line)
        return split_ids
    raise ImageError(f"no meta/{split}.json or meta/{split}.txt in {folder}")


def food101(root, target=None, split="test"):
    """The image files of Food-101's `split`, one class (`target`, key or name) or all, in the meta file's order."""
    folder = food101_root(root)
    ids = food101_split(folder, split)
    if target is not None:
        key = class_key(target)
        if key not in ids:
            close = difflib.get_close_matches(key, list(ids), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(ids)} classes in meta/{split})"
            raise ConfigError(f"--target {target!r}: no class {key!r} in Food-101's {split} split{hint}")
        ids = {key: ids[key]}
    files = [folder / "images" / f"{rel}.jpg" for rel in (r for rels in ids.values() for r in rels)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ImageError(f"{len(missing)} of {len(files)} Food-101 images are missing, e.g. {missing[0]}")
    if not files:
        raise ImageError(f"Food-101's {split} split in {folder} lists no images")
    return files


def folder_images(root):
    """Every image file under `root`, recursively, in sorted path order."""
    if not Path(root).is_dir():
        raise ImageError(f"dataset root {root} is not a folder")
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise ImageError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {root}")
    return files


def dataset_images(name, root, target=None):
    """The image files of dataset `name` (a key of the official CLI) under `root`."""
    if name not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if name in UNSUPPORTED:
        raise ConfigError(f"--dataset {name} is not supported: {UNSUPPORTED[name]}; put the images in a folder "
                          f"and pass --img_path DIR")
    if root is None:
        raise ConfigError(f"--dataset {name} needs --root DIR")
    if target is not None and name != "food":
        raise ConfigError(f"--target selects a Food-101 class; --dataset {name} has no classes")
    return food101(root, target) if name == "food" else folder_images(root)


def input_images(img_path, use_dataloader=False, dataset=None, root=None, target=None):
    """What solve.py solves: the official dataset flags when `use_dataloader`, else `img_path` (a file or folder)."""
    if not use_dataloader:
        if dataset is not None or root is not None or target is not None:
            raise ConfigError("--dataset, --root and --target need --use_dataloader (as in the official CLI)")
        return list_images(img_path)
    if dataset is None:
        raise ConfigError("--use_dataloader needs --dataset (one of " + ", ".join(DATASETS) + ")")
    return dataset_images(dataset, root, target)


def write_food101(root, per_class=3, size=(80, 64)):
    """A fabricated Food-101 folder (images/<class>/<id>.jpg, meta/test.json and test.txt, classes.txt,
    labels.txt) of small generated images. Ids are listed out of sorted order, as in the real meta files, so a
    loader that sorts instead of following the meta order is caught. Returns {class: [ids in meta order]}."""
    import numpy as np
    from PIL import Image

    classes = {"fried_rice": "Fried rice", "ice_cream": "Ice cream", "apple_pie": "Apple pie"}
    rng = np.random.default_rng(0)
    split = {}
    for k, key in enumerate(classes):
        ids = [f"{key}/{900 - 100 * j + k}" for j in range(per_class)]  # descending ids
        for rel in ids:
            path = root / "images" / f"{rel}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            smooth = np.kron(rng.uniform(0, 255, (size[1] // 8, size[0] // 8, 3)), np.ones((8, 8, 1)))
            Image.fromarray(smooth.astype(np.uint8)).save(path, quality=95)
        split[key] = ids
    meta = root / "meta"
    meta.mkdir(parents=True)
    (meta / "test.json").write_text(json.dumps(split))
    (meta / "test.txt").write_text("".join(f"{rel}\n" for ids in split.values() for rel in ids))
    (meta / "classes.txt").write_text("".join(f"{key}\n" for key in sorted(classes)))
    (meta / "labels.txt").write_text("".join(f"{classes[key]}\n" for key in sorted(classes)))
    return split
