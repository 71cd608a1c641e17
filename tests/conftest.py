import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id passed by mistake fails fast instead of hanging
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

from treg.datasets import write_food101
from treg.priors.load import load_prior
from treg.priors.tiny import build_tiny_sd


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


@pytest.fixture
def food101_dir(tmp_path):
    """A fabricated Food-101 folder (see write_food101) and its {class: [ids]}."""
    root = tmp_path / "food-101"
    return root, write_food101(root)
