"""The loops of treg.fast (cci, pigdm, ddrm) and their helpers against independent constructions on a tiny bed
(the analytic pixel prior at 16 px, ×4 SR, whose H is a dense 48×768 matrix): what the callbacks report, the start,
and the paths that tests/test_fast.py does not replay. Written from mutation testing (tests/mutation/run.sh)."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from treg.analytic import load_image
from treg.diffusion import cfg as guided_eps, randn, tweedie
from treg.operators import build_operator
from treg.pixel import AnalyticPixelPrior
from treg.solvers import SOLVERS

ROOT = Path(__file__).resolve().parent.parent
NULL_PROMPT = "out of focus, depth of field"


def dense_matrix(op, shape):
    """The (m, n) matrix of `op` on images shaped `shape` (C, H, W), float64, column by column."""
    n = math.prod(shape)
    return op.A(torch.eye(n, dtype=torch.float64).view(n, *shape)).flatten(1).T


@pytest.fixture(scope="module")
def bed():
    """16 px, ×4 SR, y = A x + 0.05·n, float64, on the analytic pixel prior; H as a dense matrix."""
    prior = AnalyticPixelPrior.from_folder()
    op = build_operator("super_resolution", 16, scale=4).double()
    x = load_image(ROOT / "samples/cat_1.jpg", 16).double()
    y = op.A(x) + 0.05 * torch.randn(op.A(x).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    uc, c = prior.embed([NULL_PROMPT, "a photo of a cat"]).double().chunk(2)
    return prior, op, y, uc, c, dense_matrix(op, (3, 16, 16))


def solve(name, bed, seed=4, callback=None, **changes):
    prior, op, y, uc, c, _ = bed
    fn, config = SOLVERS[name]
    cfg = dataclasses.replace(config(), **changes)
    return fn(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(seed), callback=callback)


@pytest.mark.parametrize("name", ["cci", "pigdm", "ddrm"])
def test_callback_reports_each_step_its_timestep_and_x0(name, bed):
    """The callback contract solve.py (info["i"], info["z0"]) and the inversion code (info["t"]) read: one call per
    step with i = 0..N−1, steps = N, t = the solver's grid (cci/pigdm: round(k_s(1 − n/N)); DDRM: its uniform grid
    (1000/N)·(N−1−n)), and z0 = x̂0 = (x − σε̂)/μ at each step; the first x̂0 is replayed from the start written out
    (cci, pigdm: μ₀·H⁺y + σ₀·n with the dense pinv of H; DDRM: x_T = n), the rest must be finite and y-shaped."""
    prior, op, y, uc, c, H = bed
    steps, k_start, seen = 3, 500, []
    changes = {"sigma_y": 0.05, "steps": steps, "cfg_guidance": 2.0}
    if name != "ddrm":
        changes["k_start"] = k_start
    solve(name, bed, callback=seen.append, **changes)
    grid = [333 * (steps - 1 - n) for n in range(steps)] if name == "ddrm" else [500, 333, 167]
    assert [info["i"] for info in seen] == list(range(steps))
    assert [info["steps"] for info in seen] == [steps] * steps
    assert [info["t"] for info in seen] == grid
    a = prior.alphas_cumprod[grid[0]].double().item()
    noise = randn((1, 3, 16, 16), torch.Generator().manual_seed(4), "cpu").double()
    pinv_y = (torch.linalg.pinv(H) @ y.flatten()).view(1, 3, 16, 16)
    x = noise if name == "ddrm" else a ** 0.5 * pinv_y + (1 - a) ** 0.5 * noise
    expected = tweedie(x, guided_eps(prior, x, grid[0], uc, c, 2.0), a)
    torch.testing.assert_close(seen[0]["z0"], expected, rtol=1e-10, atol=1e-10)
    assert all(info["z0"].shape == y.shape[:2] + (16, 16) and torch.isfinite(info["z0"]).all() for info in seen)
