import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id passed by mistake fails fast instead of hanging
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

from treg.prior import load_prior
from treg.tiny import build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random SD-shaped diffusers folder (with a CLIP image encoder), built offline once per run."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_prior(tiny_sd):
    """The tiny folder loaded through the same load_prior path that solve.py uses."""
    return load_prior(str(tiny_sd), "cpu", torch.float32, image_encoder="auto")
