"""The loops of treg.solvers.fast (cci, pigdm, ddrm) and their helpers against independent constructions on a tiny bed
(the analytic pixel prior at 16 px, ×4 SR, whose H is a dense 48×768 matrix): what the callbacks report, the start,
and the paths that tests/test_fast.py does not replay. Written from mutation testing (tests/mutation/run.sh)."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from treg.diffusion import guided_eps, randn, tweedie
from treg.operators import build_operator
from treg.priors.analytic import load_image
from treg.priors.pixel import AnalyticPixelPrior
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


class WithoutAdjoint:
    """The analytic prior with decode_adjoint hidden, so that latent_operator treats it as Stable Diffusion (no H on
    the latent): pigdm differentiates through decode with its gain in pixel space, ddrm refuses. Its decode is
    still linear (D = g·U per patch), so dense matrices give the reference. Its encode is a posterior sample, as
    the VAE's: D⁺x + 0.01·n with n from the given generator, so a solver that does not pass its generator on
    cannot reproduce a seed."""

    def __init__(self, prior):
        self._prior = prior

    def encode(self, x, generator=None):
        z = self._prior.encode(x)
        return z + 0.01 * randn(z.shape, generator, z.device).to(z)

    def __getattr__(self, name):
        if name == "decode_adjoint":
            raise AttributeError(name)
        return getattr(self._prior, name)


@pytest.fixture(scope="module")
def decoded_bed():
    """32 px, ×16 SR (y: 3×2×2) on WithoutAdjoint(AnalyticPrior) (latent 4×4×4), y = A x + 0.05·n, float64."""
    from treg.priors.analytic import AnalyticPrior
    prior = WithoutAdjoint(AnalyticPrior.from_folder())
    op = build_operator("super_resolution", 32, scale=16).double()
    x = load_image(ROOT / "samples/cat_1.jpg", 32).double()
    y = op.A(x) + 0.05 * torch.randn(op.A(x).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    uc, c = prior.embed([NULL_PROMPT, "a photo of a cat"]).double().chunk(2)
    return prior, op, y, uc, c


def dense_width(eps_fn, x, direction, mu, sigma):
    """dᵀCd/dᵀd for Tweedie's covariance C = ρ²(I − σJ) of x0 given x, J = ∂ε̂/∂x formed densely, clamped to
    [1e-6·ρ², ρ²]: the r² of pigdm's last step at its last model level."""
    n = x.numel()
    J = torch.autograd.functional.jacobian(lambda v: eps_fn(v).flatten(), x).view(n, n)
    d = direction.flatten()
    cov = (sigma / mu) ** 2 * (torch.eye(n, dtype=torch.float64) - sigma * J)
    return (d @ cov @ d / (d @ d)).clamp((sigma / mu) ** 2 * 1e-6, (sigma / mu) ** 2)


def test_pigdm_through_the_decoder_replays_the_step_with_a_dense_decoder_and_pixel_gain(decoded_bed):
    """Without an H on the latent (Stable Diffusion's case): the start μ₀·encode(A⁺y) + σ₀·n (encode = the dense
    pinv of the decoder's matrix D plus its draw from the solver's generator), the guidance
    (∂x̂0/∂x)ᵀ Mᵀ (AAᵀ + cI)⁻¹(y − M x̂0) with M = A·D and the gain of the PIXEL operator (dense AAᵀ), c = (σ_y/σ)²,
    and ΠGDM's weight ∫½w·e^{b/2} db by quadrature; then the last step x + Mᵀ(MMᵀ + (σ_y/r)² I)⁻¹(y + σ_y·n − Mx)
    with the dense M (the decoder's Jacobian, exact for this linear decoder) and r² of dense_width."""
    from scipy.integrate import quad
    from treg.solvers.fast import start_grid
    prior, op, y, uc, c = decoded_bed
    w, steps, k_start, sigma_y = 6.0, 3, 566, 0.05
    fn, config = SOLVERS["pigdm"]
    cfg = dataclasses.replace(config(), w=w, steps=steps, k_start=k_start, sigma_y=sigma_y, cfg_guidance=2.0)
    out = fn(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(4))

    D = prior.decode(torch.eye(64, dtype=torch.float64).view(64, 4, 4, 4)).flatten(1).T  # (3072, 64)
    AAt = op.A(op.At(torch.eye(12, dtype=torch.float64).view(12, 3, 2, 2))).flatten(1)  # (12, 12)
    pinv_a_y = op.At(torch.linalg.solve(AAt, y.flatten()).view(1, 3, 2, 2))  # A⁺y = Aᵀ(AAᵀ)⁻¹y
    ks = start_grid(k_start, steps)
    abar = [prior.alphas_cumprod[k].double().item() for k in ks] + [1.0]
    b = [-math.log(a) for a in abar]
    generator = torch.Generator().manual_seed(4)
    encoded = (torch.linalg.pinv(D) @ pinv_a_y.flatten()).view(1, 4, 4, 4) + 0.01 * randn((1, 4, 4, 4), generator,
                                                                                          "cpu").double()
    noise = randn((1, 4, 4, 4), generator, "cpu").double()  # drawn after encode's
    x = abar[0] ** 0.5 * encoded + (1 - abar[0]) ** 0.5 * noise
    for n, k in enumerate(ks):
        mu, sigma = abar[n] ** 0.5, (1 - abar[n]) ** 0.5
        xg = x.clone().requires_grad_()
        eps = guided_eps(prior, xg, k, uc, c, 2.0)
        seen = op.A((D @ ((xg - sigma * eps) / mu).flatten()).view(1, 3, 32, 32)).flatten()
        gain = torch.linalg.inv(AAt + (sigma_y / sigma) ** 2 * torch.eye(12, dtype=torch.float64))
        G, = torch.autograd.grad(seen, xg, gain @ (y.flatten() - seen.detach()))
        weight = quad(lambda v: 0.5 * w * math.exp(v / 2), b[n + 1], b[n], epsabs=1e-14, epsrel=1e-13)[0]
        rho = lambda a: ((1 - a) / a) ** 0.5
        M = op.A(D.T.reshape(64, 3, 32, 32)).flatten(1).T  # (12, 64)
        direction = M.T @ gain @ (y.flatten() - seen.detach())
        width = dense_width(lambda v: guided_eps(prior, v, k, uc, c, 2.0), x, direction, mu, sigma)
        x = abar[n + 1] ** 0.5 * (x / mu + (rho(abar[n + 1]) - rho(abar[n])) * eps.detach() + weight * G)
    drawn = y.flatten() + sigma_y * randn(y.shape, generator, "cpu").double().flatten()
    gain = torch.linalg.inv(M @ M.T + sigma_y ** 2 / width * torch.eye(12, dtype=torch.float64))
    x = x + (M.T @ gain @ (drawn - M @ x.flatten())).view_as(x)
    expected = (D @ x.flatten()).view(out.shape)
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-8  # measured 4.8e-10 (pinv(D), 1/μ₀ = 2.3)


def test_ddrm_refuses_a_prior_without_latent_h_and_an_operator_without_svd(decoded_bed):
    """One line each: no H on the latent (Stable Diffusion's nonlinear decoder), and motion blur (no cheap SVD)."""
    from treg.config import ConfigError
    prior, op, y, uc, c = decoded_bed
    fn, config = SOLVERS["ddrm"]
    cfg = dataclasses.replace(config(), sigma_y=0.01, steps=2)
    with pytest.raises(ConfigError, match=r"^ddrm needs the measurement as a linear map of the diffusion variable: "
                                          r"use a pixel prior or the analytic prior "
                                          r"\(Stable Diffusion's decoder is nonlinear\)$"):
        fn(prior, op, y, cfg, c=c, uc=uc)
    pixel = AnalyticPixelPrior.from_folder()
    motion = build_operator("blur", 16, kernel="motion", kernel_size=9, intensity=0.5, seed=0)
    uc, c = pixel.embed([NULL_PROMPT, "a cat"]).chunk(2)
    with pytest.raises(ConfigError, match=r"^ddrm needs an SVD of the operator: [^\n]*no cheap SVD[^\n]*$"):
        fn(pixel, motion, motion.A(torch.zeros(1, 3, 16, 16)), cfg, c=c, uc=uc)


def test_with_noise_fills_only_an_unset_sigma_y():
    """σ_y None → the task's noise; a set σ_y (0 included) and a config without σ_y (DDIM's) are left as they are."""
    from treg.solvers import with_noise
    for name in ("cci", "pigdm", "ddrm", "diffpir", "daps", "treg"):
        config = SOLVERS[name][1]
        assert with_noise(config(), 0.3) == dataclasses.replace(config(), sigma_y=0.3)
        assert with_noise(config(sigma_y=0.0), 0.3) == config(sigma_y=0.0)
    ddim = SOLVERS["ddim"][1]()
    assert not hasattr(ddim, "sigma_y") and with_noise(ddim, 0.3) == ddim


@pytest.mark.parametrize("name", ["cci", "pigdm", "ddrm"])
def test_float32_in_float32_out(name, bed):
    """fp16-ready: a float32 y gives a float32 image and float32 x̂0 in the callback (the loops run in float64),
    within float32 rounding of the float64 solve of the same seed (2e-4: cci's last step, (HHᵀ + (σ_y/r)² I)⁻¹,
    amplified y's rounding to 1.1e-4 when r was the large ρ of 2 steps' last level, k 500, measured)."""
    prior, op, y, uc, c, H = bed
    seen = []
    low = (prior, op, y.float(), uc.float(), c.float(), H)
    out = solve(name, low, callback=seen.append, sigma_y=0.05, steps=2)
    assert out.dtype == torch.float32 and all(info["z0"].dtype == torch.float32 for info in seen)
    reference = solve(name, bed, sigma_y=0.05, steps=2)
    assert ((out.double() - reference).norm() / reference.norm()).item() <= 2e-4


@pytest.mark.parametrize("name", ["cci", "pigdm", "ddrm"])
def test_the_model_sees_the_measurements_dtype(name, bed, monkeypatch):
    """fp16-ready: with a float32 y every noise prediction is asked in float32 (the model's dtype on a GPU), though
    the loop's state is float64; a float64 state handed to an fp16 UNet would fail there."""
    prior, op, y, uc, c, H = bed
    seen, eps = [], prior.eps
    monkeypatch.setattr(prior, "eps", lambda z, t, e: seen.append((z.dtype, e.dtype)) or eps(z, t, e))
    solve(name, (prior, op, y.float(), uc.float(), c.float(), H), sigma_y=0.05, steps=2)
    assert seen and set(seen) == {(torch.float32, torch.float32)}


def test_pigdm_through_the_decoder_decodes_in_the_measurements_dtype(decoded_bed, monkeypatch):
    """fp16-ready on Stable Diffusion's path: with a float32 y every latent pigdm hands the decoder, the likelihood
    step's linearisation J = ∂(A∘decode)/∂z included, is float32, and the image is float32."""
    prior, op, y, uc, c = decoded_bed
    seen, decode = [], prior.decode
    monkeypatch.setattr(prior, "decode", lambda z: seen.append(z.dtype) or decode(z))
    fn, config = SOLVERS["pigdm"]
    out = fn(prior, op, y.float(), config(steps=2, sigma_y=0.05, last_step="likelihood"), c=c.float(), uc=uc.float(),
             generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and len(seen) >= 4 and set(seen) == {torch.float32}


def test_cci_starts_from_the_inverted_start_when_asked(bed):
    """init = inversion: the first x̂0 is tweedie of the inverted start its docstring names, built here from
    treg.solvers.inversion.measurement_start: RNRI with 50 unshifted DDIM steps and the solver's text guidance (3, not
    the inversion's default 2) down to init_invert_t, re-noised to ᾱ_{k_start}, with the same generator; not of
    μ₀·H⁺y + σ₀·n."""
    from treg.solvers.inversion import InversionConfig, measurement_start
    prior, op, y, uc, c, _ = bed
    seen = []
    solve("cci", bed, callback=seen.append, sigma_y=0.05, steps=2, k_start=500, init="inversion", init_invert_t=200,
          cfg_guidance=3.0)
    a = prior.alphas_cumprod[500].double().item()
    inversion = InversionConfig(method="rnri", steps=50, cfg_guidance=3.0, official_shift=False)
    x = measurement_start(prior, op, y, inversion, 200, a, c=c, uc=uc,
                          generator=torch.Generator().manual_seed(4)).double()
    expected = tweedie(x, guided_eps(prior, x, 500, uc, c, 3.0), a)
    torch.testing.assert_close(seen[0]["z0"], expected, rtol=1e-9, atol=1e-9)


def test_cci_without_latent_h_takes_the_surrogate_and_ends_with_the_pixel_prox(decoded_bed):
    """A prior without an H on the latent (Stable Diffusion's case; here the analytic prior with decode_adjoint
    hidden): ×16 SR becomes the latent surrogate (avg-pooling by 2, so the start is P·encode(A⁺y)), y's noise is not
    modelled (one warning, its whole text), and the output with cg_iters = 5, λ = 1e-3 is treg.linalg.prox of the
    output with cg_iters = 0 for the same seed: argmin ‖Ax − y‖² + λ‖x − x₀‖² by a dense solve."""
    import warnings
    prior, op, y, uc, c = decoded_bed
    fn, config = SOLVERS["cci"]
    run = lambda **kw: fn(prior, op, y, dataclasses.replace(config(), steps=2, **kw), c=c, uc=uc,
                          generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unproxed = run(sigma_y=0.05, cg_iters=0)
    assert [str(w.message) for w in caught] == [
        "cci: the Stable Diffusion surrogate has no SVD, so y's noise is not modelled (noiseless C-ΠGDM)"]
    proxed = run(sigma_y=0.0, cg_iters=5, cg_lamb=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x0 = run(sigma_y=0.0, cg_iters=0)
    assert caught == []  # σ_y = 0 asks for the noiseless form: nothing to warn about
    torch.testing.assert_close(x0, unproxed, rtol=1e-12, atol=1e-12)  # the noiseless form either way
    A = dense_matrix(op, (3, 32, 32))
    expected = torch.linalg.solve(A.T @ A + 1e-3 * torch.eye(A.shape[1], dtype=torch.float64),
                                  A.T @ y.flatten() + 1e-3 * x0.flatten())
    # 5 CG iterations on a system whose eigenvalues take two values (λ and λ + 1/256): exact in 2
    assert (proxed.flatten() - expected).norm() <= 1e-8 * expected.norm()
    assert (op.A(proxed) - y).norm() < 0.9 * (op.A(x0) - y).norm()  # the prox moved it towards y


def test_cci_warns_in_full_when_the_projector_is_inexact_and_the_noise_unmodelled(bed):
    """Motion blur (no SVD, CG pinv): exactly the two warnings, word for word; ×4 SR (exact projector, an SVD):
    none."""
    import warnings
    prior = bed[0]
    uc, c = prior.embed([NULL_PROMPT, "a cat"]).chunk(2)
    fn, config = SOLVERS["cci"]
    x = load_image(ROOT / "samples/cat_1.jpg", 16)
    for op, expected in [
            (build_operator("blur", 16, kernel="motion", kernel_size=9, intensity=0.5, seed=0),
             ["cci: pinv∘A is not an exact projector for this operator; row-space errors grow by μ^-w",
              "cci: this operator has no SVD here, so y's noise is not modelled (noiseless C-ΠGDM)"]),
            (build_operator("super_resolution", 16, scale=4), [])]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(prior, op, op.A(x), config(sigma_y=0.01, steps=1), c=c, uc=uc, generator=torch.Generator())
        assert [str(w.message) for w in caught] == expected


def test_pigdm_without_svd_replays_the_step_with_a_dense_gain():
    """Motion blur (no SVD): the gain (HHᵀ + cI)⁻¹ by cfg.cg_iters of CG against a dense inverse, the start with
    H⁺y by the operator's own CG pinv (its tolerance, not a dense pinv), 2 steps of ΠGDM's update written out and
    the last step x + Hᵀ(HHᵀ + (σ_y/r)² I)⁻¹(y + σ_y·n − Hx) with a dense inverse and r² of dense_width."""
    from scipy.integrate import quad
    from treg.solvers.fast import start_grid
    prior = AnalyticPixelPrior.from_folder()
    op = build_operator("blur", 16, kernel="motion", kernel_size=5, intensity=0.5, seed=0).double()
    H = dense_matrix(op, (3, 16, 16))
    x_true = load_image(ROOT / "samples/cat_1.jpg", 16).double()
    y = op.A(x_true) + 0.05 * torch.randn(x_true.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    uc, c = prior.embed([NULL_PROMPT, "a photo of a cat"]).double().chunk(2)
    w, steps, k_start, sigma_y = 6.0, 2, 566, 0.05
    fn, config = SOLVERS["pigdm"]
    cfg = dataclasses.replace(config(), w=w, steps=steps, k_start=k_start, sigma_y=sigma_y, cfg_guidance=2.0,
                              cg_iters=200)
    out = fn(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(4))
    ks = start_grid(k_start, steps)
    abar = [prior.alphas_cumprod[k].double().item() for k in ks] + [1.0]
    b = [-math.log(a) for a in abar]
    generator = torch.Generator().manual_seed(4)
    noise = randn((1, 3, 16, 16), generator, "cpu").double()
    x = abar[0] ** 0.5 * op.pinv(y) + (1 - abar[0]) ** 0.5 * noise
    for n, k in enumerate(ks):
        mu, sigma = abar[n] ** 0.5, (1 - abar[n]) ** 0.5
        xg = x.clone().requires_grad_()
        eps = guided_eps(prior, xg, k, uc, c, 2.0)
        seen = H @ ((xg - sigma * eps) / mu).flatten()
        gain = torch.linalg.inv(H @ H.T + (sigma_y / sigma) ** 2 * torch.eye(len(H), dtype=torch.float64))
        G, = torch.autograd.grad(seen, xg, gain @ (y.flatten() - seen.detach()))
        weight = quad(lambda v: 0.5 * w * math.exp(v / 2), b[n + 1], b[n], epsabs=1e-14, epsrel=1e-13)[0]
        rho = lambda a: ((1 - a) / a) ** 0.5
        direction = H.T @ gain @ (y.flatten() - seen.detach())
        width = dense_width(lambda v: guided_eps(prior, v, k, uc, c, 2.0), x, direction, mu, sigma)
        x = abar[n + 1] ** 0.5 * (x / mu + (rho(abar[n + 1]) - rho(abar[n])) * eps.detach() + weight * G)
    drawn = y.flatten() + sigma_y * randn(y.shape, generator, "cpu").double().flatten()
    gain = torch.linalg.inv(H @ H.T + sigma_y ** 2 / width * torch.eye(len(H), dtype=torch.float64))
    x = x + (H.T @ gain @ (drawn - H @ x.flatten())).view_as(x)
    assert ((out - x).norm() / x.norm()).item() <= 1e-6
