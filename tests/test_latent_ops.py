"""H on the diffusion variable (treg.latent_ops) against dense matrices built here, basis vector by basis vector:
M = A∘decode for the analytic prior, the pixel operator itself for a pixel prior, and the latent surrogate's mask and
pooling for Stable Diffusion."""
import types

import pytest
import torch

from treg import latent_ops
from treg.config import ConfigError
from treg.latent_ops import DecodedOperator, LatentSurrogate, SpectralOperator, latent_operator, projector
from treg.operators import Inpainting, build_operator
from treg.priors.analytic import AnalyticPrior

SIZE = 32  # latents (4, 4, 4): n = 64


def dense(apply, shape):
    """The matrix (m, n) of a linear map on float64 tensors of `shape`: its images of the n basis vectors."""
    n = torch.Size(shape).numel()
    return apply(torch.eye(n, dtype=torch.float64).view(n, *shape)).flatten(1).T


def truncated_pinv(matrix, rtol):
    """Moore–Penrose pseudo-inverse with singular values below rtol·max dropped, from torch's SVD."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    inverse = torch.where(s >= rtol * s.max(), 1 / s, torch.zeros_like(s))
    return vh.T @ torch.diag(inverse) @ u.T


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(["a", "b"], means=torch.zeros(2, 4, 1, 1), std=0.1)


OPERATORS = {  # name -> (operator, the rtol its pinv uses)
    "sr16": (("super_resolution", {"scale": 16}), 1e-6),  # 12 measurements < 64 latents: built through Mᵀ
    "box": (("inpainting", {"mask": "box", "size": 12, "top": 3, "left": 9}), 1e-6),  # 3072 ≥ 64: through M
    "blur": (("blur", {"kernel": "gaussian", "kernel_size": 9, "std": 3.0}), 3e-2),  # Blur.pinv_rtol
}


def decoded_dense(prior, spec):
    """M = A∘decode as a dense (m, 64) matrix, from a float64 copy of the pixel operator."""
    latent = (4, SIZE // 8, SIZE // 8)
    op = build_operator(spec[0], SIZE, **spec[1]).double()
    return dense(lambda z: op.A(prior.decode(z)), latent), latent


@pytest.mark.parametrize("name", list(OPERATORS))
def test_decoded_operator_is_the_dense_a_times_decode_with_its_truncated_pinv_and_svd(prior, name, one_thread):
    spec, rtol = OPERATORS[name]
    op = build_operator(spec[0], SIZE, **spec[1])
    m, latent = decoded_dense(prior, spec)
    h = latent_operator(prior, op, torch.zeros(1, *latent))
    assert isinstance(h, DecodedOperator)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, *latent, generator=g, dtype=torch.float64)
    y = torch.randn(3, m.shape[0], generator=g, dtype=torch.float64)
    measured = h.A(z)
    y = y.view(measured.shape)
    torch.testing.assert_close(measured.flatten(1), z.flatten(1) @ m.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h.At(y).flatten(1), y.flatten(1) @ m, rtol=1e-10, atol=1e-10)
    pinv = truncated_pinv(m, rtol)
    assert h.pinv(y).shape == z.shape
    torch.testing.assert_close(h.pinv(y).flatten(1), y.flatten(1) @ pinv.T, rtol=1e-7, atol=1e-8)
    p = projector(h)
    torch.testing.assert_close(p(z).flatten(1), z.flatten(1) @ (pinv @ m).T, rtol=1e-7, atol=1e-8)
    # the SVD: M = U S Vᵀ with V orthogonal (n × n), Uᵀ M = S Vᵀ, and the same singular values as M's (truncated)
    d = h.svd(z)
    torch.testing.assert_close(d.V(d.Vt(z)), z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d.U(d.singulars * d.Vt(z)), measured, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(d.Ut(measured), d.singulars * d.Vt(z), rtol=1e-7, atol=1e-8)
    s = torch.linalg.svdvals(m)
    kept = torch.sort(d.singulars, descending=True).values
    expected = torch.zeros(z[0].numel(), dtype=torch.float64)
    expected[: len(s)] = torch.where(s >= rtol * s.max(), s, torch.zeros_like(s))
    torch.testing.assert_close(kept, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", ["sr16", "box"])
def test_large_latents_fall_back_to_a_cg_pinv_without_an_svd(prior, name, monkeypatch, one_thread):
    """Above DENSE_LIMIT latent dimensions M⁺y is the minimum-norm CG solution of MᵀM u = Mᵀy from 0."""
    spec, _ = OPERATORS[name]
    op = build_operator(spec[0], SIZE, **spec[1])
    m, latent = decoded_dense(prior, spec)
    monkeypatch.setattr(latent_ops, "DENSE_LIMIT", 63)  # one below this latent's 64 dimensions
    h = latent_operator(prior, op, torch.zeros(1, *latent))
    g = torch.Generator().manual_seed(1)
    y = (torch.randn(2, m.shape[1], generator=g, dtype=torch.float64) @ m.T).view(h.A(torch.zeros(2, *latent)).shape)
    y = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)  # not in range(M): least squares
    torch.testing.assert_close(h.pinv(y).flatten(1), y.flatten(1) @ torch.linalg.pinv(m).T, rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="only up to 63 latent dimensions; this image has 64"):
        h.svd(torch.zeros(1, *latent))


def pixel_prior():
    return types.SimpleNamespace(vae_scale_factor=1)


@pytest.mark.parametrize("spec,rtol", [(("super_resolution", {"scale": 4}), 1e-6),
                                       (("blur", {"kernel": "gaussian", "kernel_size": 5, "std": 2.0}), 3e-2)])
def test_pixel_prior_gets_the_operators_own_svd_pinv_in_float64(spec, rtol, one_thread):
    size = 8
    op = build_operator(spec[0], size, **spec[1])
    like = torch.zeros(1, 3, size, size)
    h = latent_operator(pixel_prior(), op, like)
    assert isinstance(h, SpectralOperator)
    a = dense(build_operator(spec[0], size, **spec[1]).double().A, (3, size, size))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, size, size, generator=g)  # float32 in: float64 out
    y = op.A(x)
    assert h.A(x).dtype == h.pinv(y).dtype == h.At(y).dtype == torch.float64
    torch.testing.assert_close(h.A(x).flatten(1), x.double().flatten(1) @ a.T)
    torch.testing.assert_close(h.At(y).flatten(1), y.double().flatten(1) @ a)
    torch.testing.assert_close(h.pinv(y).flatten(1), y.double().flatten(1) @ truncated_pinv(a, rtol).T,
                               rtol=1e-6, atol=1e-6)
    p = projector(h)
    torch.testing.assert_close(p(p(x)), p(x), rtol=1e-10, atol=1e-10)  # exactly idempotent
    assert h.svd(like) is h.spectral


def test_pixel_prior_without_an_svd_uses_the_operator_itself():
    op = build_operator("blur", 8, kernel="motion", kernel_size=5, intensity=0.5, seed=0)
    assert latent_operator(pixel_prior(), op, torch.zeros(1, 3, 8, 8)) is op


def sd_like_prior():
    return types.SimpleNamespace(vae_scale_factor=8)  # no decode_adjoint: a nonlinear decoder


def test_stable_diffusion_gets_no_operator_unless_the_surrogate_is_asked_for():
    op = build_operator("inpainting", 32, mask="box", size=8, top=0, left=0)
    assert latent_operator(sd_like_prior(), op, torch.zeros(1, 4, 4, 4)) is None
    assert isinstance(latent_operator(sd_like_prior(), op, torch.zeros(1, 4, 4, 4), surrogate=True), LatentSurrogate)


def test_surrogate_inpainting_observes_a_latent_only_where_its_whole_patch_is_observed():
    mask = torch.ones(32, 32)
    mask[3, 5] = 0  # one hole in patch (0, 0)
    mask[8:16, 16:24] = 0  # all of patch (1, 2)
    h = LatentSurrogate(Inpainting(mask), 8)
    expected = torch.tensor([[float(mask[8 * i:8 * i + 8, 8 * j:8 * j + 8].all()) for j in range(4)]
                             for i in range(4)])
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(h.A(z), z * expected)
    torch.testing.assert_close(h.pinv(z), z * expected)
    assert expected.sum() == 14


@pytest.mark.parametrize("scale,pool", [(16, 2), (8, 1)])
def test_surrogate_sr_is_latent_average_pooling_with_nearest_upsampling_as_its_pinv(scale, pool):
    h = LatentSurrogate(build_operator("super_resolution", 64, scale=scale), 8)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = dense(h.A, (4, 8, 8))
    blocks = z.view(1, 4, 8 // pool, pool, 8 // pool, pool).mean((3, 5))
    torch.testing.assert_close(h.A(z), blocks)
    y = torch.randn(1, 4, 8 // pool, 8 // pool, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(h.pinv(y).flatten(1), y.flatten(1) @ torch.linalg.pinv(a).T)


@pytest.mark.parametrize("op", [build_operator("super_resolution", 32, scale=4),
                                build_operator("blur", 32, kernel="gaussian", kernel_size=5, std=1.0)])
def test_surrogate_refuses_what_it_cannot_stand_in_for(op):
    with pytest.raises(ConfigError, match="only for inpainting and ×8/×16 SR"):
        LatentSurrogate(op, 8)



@pytest.mark.parametrize("name,rtol,kept", [("sr16", 0.9, 9), ("blur", 1.0, 1)])
def test_decoded_operator_truncates_at_the_operators_own_pinv_rtol_inclusively(prior, name, rtol, kept, one_thread):
    """An operator's `pinv_rtol` sets the cut: singular values s ≥ rtol·max are kept (sr16's 12 are 1 (×3) … 0.84,
    9 of them ≥ 0.9; blur's largest is unique, and rtol = 1 keeps exactly it, by ≥), the rest count as 0 in the
    pinv and the SVD."""
    spec, _ = OPERATORS[name]
    op = build_operator(spec[0], SIZE, **spec[1])
    op.pinv_rtol = rtol
    m, latent = decoded_dense(prior, spec)
    h = latent_operator(prior, op, torch.zeros(1, *latent))
    singulars = torch.sort(h.svd(torch.zeros(1, *latent)).singulars, descending=True).values
    s = torch.linalg.svdvals(m)
    assert int((singulars > 0).sum()) == kept
    torch.testing.assert_close(singulars[:kept], s[:kept], rtol=1e-8, atol=1e-8)
    y = torch.randn(2, m.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = y.view(h.A(torch.zeros(2, *latent)).shape)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    pinv = vh[:kept].T @ torch.diag(1 / s[:kept]) @ u[:, :kept].T
    torch.testing.assert_close(h.pinv(y).flatten(1), y.flatten(1) @ pinv.T, rtol=1e-7, atol=1e-8)


def test_dense_limit_is_inclusive(monkeypatch):
    """A latent of exactly DENSE_LIMIT dimensions is still formed densely (it has an SVD); one more is not."""
    prior = AnalyticPrior(["a"], means=torch.zeros(1, 4, 1, 1), std=0.1)
    op = build_operator("super_resolution", SIZE, scale=16)
    monkeypatch.setattr(latent_ops, "DENSE_LIMIT", 64)
    assert latent_operator(prior, op, torch.zeros(1, 4, 4, 4)).v is not None
    monkeypatch.setattr(latent_ops, "DENSE_LIMIT", 63)
    assert latent_operator(prior, op, torch.zeros(1, 4, 4, 4)).v is None


def test_cg_pinv_meets_its_relative_tolerance_for_a_tiny_measurement(prior, monkeypatch, one_thread):
    """The CG pinv's stopping tolerance is relative to ‖Mᵀy‖: a measurement of norm 1e-6 gets the same relative
    accuracy (normal-equation residual ≤ 1e-9 of ‖Mᵀy‖) as one of norm 1."""
    spec, _ = OPERATORS["box"]
    op = build_operator(spec[0], SIZE, **spec[1])
    m, latent = decoded_dense(prior, spec)
    monkeypatch.setattr(latent_ops, "DENSE_LIMIT", 63)
    h = latent_operator(prior, op, torch.zeros(1, *latent))
    y = 1e-6 * torch.randn(1, m.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    u = h.pinv(y.view(h.A(torch.zeros(1, *latent)).shape)).flatten(1)
    b = y @ m
    assert ((u @ m.T @ m - b).norm() / b.norm()).item() < 1e-9


def test_surrogate_keeps_the_latents_dtype_and_names_what_it_supports():
    mask = torch.ones(32, 32)
    mask[:8, :8] = 0
    h = LatentSurrogate(Inpainting(mask), 8)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(8)).half()  # an fp16 pipeline
    assert h.A(z).dtype == h.pinv(z).dtype == torch.float16
    with pytest.raises(ConfigError, match="^on Stable Diffusion, cci has a latent surrogate only for inpainting and "
                                          "×8/×16 SR$"):
        LatentSurrogate(build_operator("super_resolution", 32, scale=4), 8)
