import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id passed by mistake fails fast instead of hanging
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

from treg.prior import load_prior
from treg.tiny import build_tiny_sd


@pytest.fixture(scope="module")
def one_thread():
    """The analytic prior's tensors are tiny: one thread avoids OpenMP overhead on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random SD-shaped diffusers folder (with a CLIP image encoder), built offline once per run."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_prior(tiny_sd):
    """The tiny folder loaded through the same load_prior path that solve.py uses."""
    return load_prior(str(tiny_sd), "cpu", torch.float32, image_encoder="auto")


def write_food101(root, per_class=3, size=(80, 64)):
    """A fabricated Food-101 folder (images/<class>/<id>.jpg, meta/test.json and test.txt, classes.txt,
    labels.txt) of small generated images. Ids are listed out of sorted order, as in the real meta files, so a
    loader that sorts instead of following the meta order is caught. Returns {class: [ids in meta order]}."""
    import json

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
    meta.mkdir()
    (meta / "test.json").write_text(json.dumps(split))
    (meta / "test.txt").write_text("".join(f"{rel}\n" for ids in split.values() for rel in ids))
    (meta / "classes.txt").write_text("".join(f"{key}\n" for key in sorted(classes)))
    (meta / "labels.txt").write_text("".join(f"{classes[key]}\n" for key in sorted(classes)))
    return split


@pytest.fixture
def food101_dir(tmp_path):
    """A fabricated Food-101 folder (see write_food101) and its {class: [ids]}."""
    root = tmp_path / "food-101"
    return root, write_food101(root)
