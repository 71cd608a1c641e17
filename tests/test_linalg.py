import pytest
import torch

from treg.linalg import conjugate_gradient, prox
from treg.operators import build_operator


def random_spd_map(batch, n, seed=0):
    """A per-sample SPD map on (batch, 3, h, w) tensors with n = 3hw, and its matrices, condition number ≲ 50."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(1, 50, n, dtype=torch.float64).expand(batch, n)
    m = q @ torch.diag_embed(eig) @ q.mT
    return (lambda x: (m @ x.flatten(1).unsqueeze(-1)).view_as(x)), m


def test_cg_solves_random_spd_system_per_sample():
    apply, m = random_spd_map(3, 48)
    x_true = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    x = conjugate_gradient(apply, apply(x_true), torch.zeros_like(x_true), iters=100)
    err = (x - x_true).flatten(1).norm(dim=1) / x_true.flatten(1).norm(dim=1)
    assert err.max() < 1e-6


def test_cg_samples_are_independent():
    # Few iterations, so per-sample step sizes matter: a batch-wide inner product would change every sample.
    apply, m = random_spd_map(2, 48)
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    batched = conjugate_gradient(apply, b, torch.zeros_like(b), iters=5)
    for i in range(2):
        alone = conjugate_gradient(
            lambda x: (m[i] @ x.flatten(1).unsqueeze(-1)).view_as(x), b[i : i + 1], torch.zeros_like(b[i : i + 1]), 5
        )
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-12, atol=1e-12)


def test_cg_converged_sample_stays_finite():
    apply, _ = random_spd_map(2, 48)
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    b[0] = 0  # already solved by x0 = 0: zero residual and zero search direction
    x = conjugate_gradient(apply, b, torch.zeros_like(b), iters=30)
    assert torch.isfinite(x).all()
    assert (x[0] == 0).all()
    assert (apply(x) - b)[1].norm() < 1e-3 * b[1].norm()


def test_cg_stops_early_at_tolerance():
    calls = []

    def identity(x):
        calls.append(1)
        return x

    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = conjugate_gradient(identity, b, torch.zeros_like(b), iters=50, tol=1e-8)
    torch.testing.assert_close(x, b)
    assert len(calls) == 2  # initial residual + one step; the residual is then 0 < tol
    calls.clear()
    conjugate_gradient(identity, b, torch.zeros_like(b), iters=50, tol=0.0)
    assert len(calls) == 51


def test_cg_with_a_tolerance_stops_each_sample_as_if_it_were_alone():
    """A projected map Q(A + cI)Q (the fast solvers' gain on a truncated SVD) with c 1e-6 for one sample and 1e3 for
    the other: the second converges in a few steps; iterated on while the first still runs, its residual is
    rounding along the projected-out directions, where the map is 0, and x grew to 1e13 (measured before the fix,
    with both right-hand sides of one size). Each sample, with its own tolerance (a (B,) tensor; here their sizes
    differ by 1e13), must come out as it does alone."""
    g = torch.Generator().manual_seed(0)
    n, k = 40, 10
    basis, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    half = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -4, n, dtype=torch.float64)
    a = half @ half.T
    project = lambda v: v - (v @ basis) @ basis.T
    c = torch.tensor([1e-6, 1e3], dtype=torch.float64).view(2, 1)
    sizes = torch.tensor([[1.0], [1e-13]], dtype=torch.float64)
    b = project(torch.randn(2, n, generator=g, dtype=torch.float64)) * sizes
    tol = 1e-12 * b.norm(dim=1)  # one tolerance for both (their largest) would stop the second before its first step
    both = conjugate_gradient(lambda v: project(project(v) @ a + c * project(v)), b, torch.zeros_like(b), 200, tol)
    for i in range(2):
        ci = c[i : i + 1]
        alone = conjugate_gradient(lambda v: project(project(v) @ a + ci * project(v)), b[i : i + 1],
                                   torch.zeros_like(b[i : i + 1]), 200, tol[i].item())
        assert ((both[i : i + 1] - alone).norm() / alone.norm()).item() < 1e-9
    assert both[1].norm() <= b[1].norm() / 1e3  # the map is ≥ c = 1e3 on range(Q), so ‖x‖ ≤ ‖b‖/c


@pytest.fixture
def sr():
    return build_operator("super_resolution", 64, scale=4).double()


def test_prox_lowers_the_data_residual(sr):
    g = torch.Generator().manual_seed(1)
    x_true, x0 = torch.rand(2, 2, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
    y = sr.A(x_true)
    x = prox(sr, x0, y, lamb=1e-4, iters=5, tol=1e-4)
    before = (sr.A(x0) - y).flatten(1).norm(dim=1)
    after = (sr.A(x) - y).flatten(1).norm(dim=1)
    assert (after < 0.1 * before).all()


def test_prox_tends_to_pinv_as_lambda_vanishes(sr):
    y = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    x = prox(sr, torch.zeros(2, 3, 64, 64, dtype=torch.float64), y, lamb=1e-10, iters=30)
    torch.testing.assert_close(x, sr.pinv(y), rtol=0, atol=1e-5 * sr.pinv(y).abs().max().item())


def test_prox_with_large_lambda_stays_at_x0(sr):
    x0 = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    x = prox(sr, x0, torch.randn(1, 3, 16, 16, dtype=torch.float64), lamb=1e6, iters=5)
    assert (x - x0).norm() < 1e-5 * x0.norm()


class DenseOperator:
    """A = a (m × n) matrix on (B, n) vectors, counting how often A is applied."""

    def __init__(self, a):
        self.a, self.calls = a, 0

    def A(self, x):
        self.calls += 1
        return x @ self.a.T

    def At(self, y):
        return y @ self.a


def test_prox_is_the_dense_regularised_solve_and_stops_at_its_tolerance():
    """n CG steps solve the n × n normal equations (AᵀA + λI) x = Aᵀy + λx0 exactly; a tol above the first
    residual returns x0 untouched; the default tol (0) and a tol below the residuals run every step. The scale
    is chosen so that every residual norm is below 1."""
    g = torch.Generator().manual_seed(2)
    op = DenseOperator(torch.randn(8, 6, generator=g, dtype=torch.float64))
    x0, y = 1e-3 * torch.randn(2, 6, generator=g, dtype=torch.float64), 1e-3 * torch.randn(2, 8, generator=g,
                                                                                          dtype=torch.float64)
    lamb = 0.3
    dense = torch.linalg.solve(op.a.T @ op.a + lamb * torch.eye(6, dtype=torch.float64), (y @ op.a + lamb * x0).T).T
    torch.testing.assert_close(prox(op, x0, y, lamb, iters=6), dense, rtol=1e-9, atol=1e-12)
    first = (y @ op.a + lamb * x0 - (x0 @ op.a.T) @ op.a - lamb * x0).norm(dim=1).max().item()
    assert first < 1
    op.calls = 0
    assert torch.equal(prox(op, x0, y, lamb, iters=6, tol=1.01 * first), x0) and op.calls == 1
    for tol in ({}, {"tol": 1e-30}):
        op.calls = 0
        prox(op, x0, y, lamb, iters=4, **tol)
        assert op.calls == 5  # the initial residual and 4 steps
