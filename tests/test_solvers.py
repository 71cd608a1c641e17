"""Solvers on the tiny offline SD: shapes, data consistency, adaptive negation's closed form, determinism."""
import dataclasses

import pytest
import torch

from treg.config import ConfigError
from treg.images import load_image
from treg.operators import build_operator
from treg.solvers import SOLVERS
from treg.solvers.latent import TRegConfig, adaptive_negation, residual_norm, treg


@pytest.fixture(scope="module")
def problem(tiny_prior):
    op = build_operator("super_resolution", 64, scale=8)
    x = load_image("samples/cat_1.jpg", 64)
    g = torch.Generator().manual_seed(0)
    y = op.A(x) + 0.01 * torch.randn(op.A(x).shape, generator=g)
    uc, c = tiny_prior.embed(["out of focus, depth of field", "a photo of a cat"]).chunk(2)
    return op, x, y, uc, c


def solve(name, prior, problem, seed=0, **changes):
    op, _, y, uc, c = problem
    fn, config = SOLVERS[name]
    cfg = dataclasses.replace(config(), **changes)
    if getattr(cfg, "sigma_y", 0) is None:  # ΠGDM and DDRM model y's noise; solve.py sets the task's
        cfg = dataclasses.replace(cfg, sigma_y=0.01)
    return fn(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_runs_three_steps(name, tiny_prior, problem):
    if name == "ddrm":  # needs an exact SVD of the measurement of the latent; SD's decoder is nonlinear
        with pytest.raises(ConfigError, match="linear map"):
            solve(name, tiny_prior, problem, steps=3)
        return
    if name == "tds-svd":  # likewise: its Gaussian parts live in the SVD of A∘decode
        with pytest.raises(ConfigError, match="needs the SVD of A∘decode"):
            solve(name, tiny_prior, problem, steps=3)
        return
    x = solve(name, tiny_prior, problem, steps=3)
    assert x.shape == (1, 3, 64, 64) and torch.isfinite(x).all()


def test_data_consistency_step_lowers_the_residual(tiny_prior, problem):
    """On every data-consistency step, the CG prox x0y fits y far better than the Tweedie decode D(ẑ0)."""
    op, _, y, uc, c = problem
    seen = []

    def check(info):
        if "x0y" in info:
            before = residual_norm(op, y, tiny_prior.decode(info["z0"])).item()
            seen.append((residual_norm(op, y, info["x0y"]).item(), before))

    treg(tiny_prior, op, y, TRegConfig(steps=12), c=c, uc=uc, generator=torch.Generator().manual_seed(0),
         callback=check)
    assert len(seen) == 4  # steps 0, 3, 6, 9 of 12 (9 < 0.85·12)
    assert all(after < 0.2 * before for after, before in seen), seen


def test_adaptive_negation_is_a_signed_step(tiny_prior, problem):
    _, x, _, uc, _ = problem
    f = tiny_prior.image_features(x)
    g = (f / f.norm(dim=-1, keepdim=True) / uc.shape[1])[:, None, :]  # ∂ mean_k⟨f̂, uc_k⟩ / ∂uc_k, constant
    out = adaptive_negation(tiny_prior, x, uc, lr=1e-3, iters=10)
    # Adam with a constant gradient steps by lr·g/(|g| + eps) = lr·sign(g) wherever |g| ≫ eps = 1e-8
    assert torch.allclose(out, uc - 10 * 1e-3 * g / (g.abs() + 1e-8), atol=1e-6)
    big = g.abs() > 1e-5
    assert torch.allclose(out[big.expand_as(out)], (uc - 10 * 1e-3 * torch.sign(g))[big.expand_as(out)], atol=1e-6)
    assert not torch.allclose(out, uc)


def test_treg_with_adaptive_negation_and_dps_runs(tiny_prior, problem):
    x = solve("treg", tiny_prior, problem, steps=6, use_AN=True, use_DPS=True)
    assert torch.isfinite(x).all()


def test_same_seed_same_output_different_seed_different_output(tiny_prior, problem):
    a = solve("treg", tiny_prior, problem, seed=3, steps=6, use_AN=True)
    b = solve("treg", tiny_prior, problem, seed=3, steps=6, use_AN=True)
    c = solve("treg", tiny_prior, problem, seed=4, steps=6, use_AN=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_of_two_equals_two_single_solves(tiny_prior, problem):
    """Per-image generators make image i's result independent of what it is batched with."""
    op, _, y, uc, c = problem
    cfg = TRegConfig(steps=6, use_AN=True)
    y2 = torch.cat([y, y.flip(-1)])
    both = treg(tiny_prior, op, y2, cfg, c=c, uc=uc,
                generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    second = treg(tiny_prior, op, y2[1:], cfg, c=c, uc=uc, generator=[torch.Generator().manual_seed(2)])
    assert torch.allclose(both[1:], second, atol=1e-4)


def test_prompts_longer_than_77_tokens_are_truncated_with_a_warning(tiny_prior):
    long = " ".join(["a photo of a cat"] * 40)
    with pytest.warns(UserWarning, match="truncated to 77"):
        e = tiny_prior.embed([long, long + " and a dog"])
    assert e.shape[:2] == (2, 77) and torch.isfinite(e).all()
    assert torch.allclose(e[0], e[1], atol=1e-5)  # what lies past the 77th token changes nothing
    assert not torch.allclose(e[0], tiny_prior.embed(["a photo of a dog"])[0], atol=1e-2)
