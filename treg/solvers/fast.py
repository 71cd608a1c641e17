"""Few-step solvers for linear inverse problems: CCI (C-ΠGDM), ΠGDM and DDRM, with the text as classifier-free
guidance inside ε̂. Same signature as treg.solvers; registered in treg.solvers.SOLVERS.

They need the measurement as a linear operator H on the diffusion variable (treg.latent_ops): the pixel operator on
a pixel prior, M = A∘decode on the analytic prior; on Stable Diffusion ΠGDM differentiates through the decoder,
CCI uses an experimental latent surrogate, and DDRM refuses. All three integrate from diffusion level ᾱ_k to the
clean level ᾱ = 1, so the last step returns a sample, not a Tweedie estimate. All three model y's noise σ_y (the
task's noise_scale unless the YAML sets it): ΠGDM and DDRM as their papers do, CCI by integrating ΠGDM's noisy
guidance exactly in H's SVD basis where H has one (`cci_basis`; not the official N-C-ΠGDM), else in its noiseless
form; with σ_y > 0 CCI and ΠGDM then put y's noise back (`likelihood_step`; `last_step: ode` skips it), so that they
do not fit it. Notation: b = −log ᾱ, μ = √ᾱ = e^{−b/2},
σ = √(1−ᾱ), ρ = σ/μ; x̂0 = (x − σε̂)/μ.

    CCI    Pandey, Yang, Mandt, "Fast Samplers for Inverse Problems in Iterative Refinement Models", NeurIPS 2024
    ΠGDM   Song, Vahdat, Mardani, Kautz, "Pseudoinverse-Guided Diffusion Models for Inverse Problems", ICLR 2023
    DDRM   Kawar, Elad, Ermon, Song, "Denoising Diffusion Restoration Models", NeurIPS 2022
"""
import dataclasses
import math
import typing
import warnings

import numpy
import torch
from scipy.integrate import quad
from torch.nn.attention import SDPBackend, sdpa_kernel

from treg.config import ConfigError, bounded, one_of
from treg.diffusion import guided_eps, randn, tweedie
from treg.latent_ops import LatentSurrogate, latent_operator, projector
from treg.linalg import conjugate_gradient, prox
from treg.solvers.inversion import InversionConfig, measurement_start


def _latent_like(prior, op, y):
    """A float64 zero latent (B, C, h, w) for the image size of `op`."""
    b, _, h, w = op.At(y).shape
    f = prior.vae_scale_factor
    return torch.zeros(b, prior.latent_channels, h // f, w // f, dtype=torch.float64, device=y.device)


def _levels(prior, k):
    """(μ, σ) at timestep k as Python floats; k = None is the clean level ᾱ = 1."""
    a = 1.0 if k is None else float(prior.alphas_cumprod[k].double())
    return a ** 0.5, (1 - a) ** 0.5


def start_grid(k_start, steps):
    """Model timesteps k_n = round(k_start·(1 − n/N)), n < N; the integration ends at ᾱ = 1 after the last."""
    return [round(k_start * (1 - n / steps)) for n in range(steps)]


def _measurement_inverse(prior, op, h, y, generator):
    """H⁺y on the diffusion variable; on Stable Diffusion (no exact H) encode(A⁺y), a VAE posterior sample."""
    if h is None or isinstance(h, LatentSurrogate):
        return prior.encode(op.pinv(y), generator).double()
    return h.pinv(y)


class LinearisedOperator:
    """J = ∂(A∘decode)/∂z at z0, in the dtype of z0: the measurement as a linear map of the latent on a prior
    without an exact one (Stable Diffusion, or any prior that shows only the prior interface); exact where decode is
    linear. One graph of A(decode(z0)) and of its backward: Jᵀu is its backward, Jv the backward of that backward
    (linear in u, so ∂⟨Jᵀu, v⟩/∂u = Jv). Plain autograd, not torch.func, so that custom autograd.Functions on the
    way (solve.py's profiling marks) are allowed."""

    def __init__(self, prior, op, z0):
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # fused attention has no double backward
            self.z0 = z0.detach().requires_grad_()
            self.value = op.A(prior.decode(self.z0))  # A(decode(z0))
            self.u = torch.zeros_like(self.value, requires_grad=True)
            self.grad, = torch.autograd.grad(self.value, self.z0, self.u, create_graph=True)

    def A(self, v):
        with torch.enable_grad():
            return torch.autograd.grad(self.grad, self.u, v.to(self.grad), retain_graph=True)[0].detach()

    def At(self, u):
        with torch.enable_grad():
            return torch.autograd.grad(self.value, self.z0, u.to(self.value), retain_graph=True)[0].detach()


def conditional_variance(direction, jacobian_t_direction, mu, sigma):
    """r² = dᵀ Cov[z0 | x] d / dᵀd per sample: the variance of the clean latent given the state x at the last
    model level along the direction d, from Tweedie's second moment Cov[z0 | x] = ρ²(I − σ ∂ε̂/∂x) (exact for the
    true score, whose Jacobian is symmetric, so dᵀ(∂ε̂/∂x)d = dᵀ·(∂ε̂/∂x)ᵀd, the vector–Jacobian product the guidance
    already computes). For a Gaussian prior N(m, τ²I) it is ρ²τ²/(ρ² + τ²), whatever d. Clamped to [1e-6·ρ², ρ²]:
    CFG's ε̂ is not one score. Returns a float64 tensor (B,)."""
    d, jd = direction.flatten(1).double(), jacobian_t_direction.flatten(1).double()
    dd = (d * d).sum(1)
    fraction = torch.where(dd > 0, 1 - sigma * (d * jd).sum(1) / dd.clamp(min=1e-300), torch.ones_like(dd))
    return (sigma / mu) ** 2 * fraction.clamp(1e-6, 1.0)


def likelihood_step(prior, op, h, z, y, sigma_y, width, cg_iters, generator):
    """The last step's data term with y's noise: z + Hᵀ(HHᵀ + (σ_y/r)² I)⁻¹(y + σ_y·n − Hz), n ~ N(0, I), i.e. the
    mean of N(z, r²I)·N(y + σ_y·n; Hz, σ_y² I): Matheron's rule, an exact draw from the posterior of z0 given x and
    y when z is a draw of N(E[z0 | x], r²I). r² = `width` (B,), the variance of z0 given the last model level's x
    (conditional_variance), not that level's ρ², which is the prior's width only where the prior is flat (at
    σ_y 0.1 on the exact bed ρ² put solutions 3–4 posterior widths off their mode). Where s·r ≫ σ_y along a
    singular value s of H it sets Hz = y + σ_y·n (the residual about one noise floor, as the exact posterior's);
    where s·r ≪ σ_y it leaves z. H: the exact latent operator, else J = ∂(A∘decode)/∂z at z (LinearisedOperator).
    Returns the latent in float64."""
    if h is None:  # through the decoder in the model's dtype
        h = LinearisedOperator(prior, op, z.to(y.dtype))
        seen = h.value.detach()
    else:
        seen = h.A(z)
    misfit = (y.double() + sigma_y * randn(y.shape, generator, y.device).double()).to(seen) - seen
    return z + h.At(gain_solver(h, z, cg_iters)(misfit, (sigma_y ** 2 / width).to(seen))).double()


# --- CCI ---------------------------------------------------------------------------------------------------------


def cci_coefficients(b, w):
    """Φ(b) = ∫₀^b φ(b') db' for the five CCI integrands with λ = 0 (fast-samplers reference §1.2):
    φ_y = −½wμ^w, φ_s1 = ½e^{b/2}/σ, φ_s2 = ½e^{b/2}(μ^w − 1)/σ − ½wσμ^{w−1}, φ_j1 = ½wσ, φ_j2 = ½wσ(μ^w − 1).
    All but Φ_j2 have closed forms; Φ_j2 is one scipy quadrature. Returns a dict of floats (float64)."""
    mu, sigma = math.exp(-b / 2), math.sqrt(-math.expm1(-b))
    rho = math.sqrt(math.expm1(b))
    j2 = quad(lambda u: 0.5 * w * math.sqrt(-math.expm1(-u)) * math.expm1(-w * u / 2), 0.0, b,
              epsabs=1e-14, epsrel=1e-12)[0] if b > 0 else 0.0
    return {"y": mu ** w - 1, "s1": rho, "s2": rho * (mu ** w - 1), "j1": w * (math.asinh(rho) - sigma), "j2": j2}


@dataclasses.dataclass
class CCIConfig:
    """C-ΠGDM (Pandey, Yang, Mandt, NeurIPS 2024): split update with closed-form coefficients; with σ_y > 0 and an
    SVD of H, ΠGDM's noisy guidance integrated exactly per singular value (see `cci_basis`: it converges to ΠGDM's
    noisy ODE, which the official N-C-ΠGDM does not)."""
    steps: int = bounded(5, 1, 1000)            # conditional steps = NFE (official demo: 5)
    w: float = bounded(15.0, 0, 100)            # ΠGDM guidance weight inside the projector Φ (official demo: 15)
    k_start: int = bounded(999, 1, 999)         # first timestep (measured, docs/solvers.md "Text that chooses")
    cfg_guidance: float = bounded(4.0, 0, 100)  # text CFG weight of ε̂ (project default); 0 = without text
    sigma_y: float | None = bounded(None, 0, 10)  # y's noise std; None = the task's noise_scale; 0 = noiseless form
    cg_lamb: float = bounded(1e-4, 0, 1e6, low_open=True)  # Stable Diffusion only: final pixel prox λ (TReg's)
    cg_iters: int = bounded(5, 0, 10000)        # Stable Diffusion only: its CG iterations (TReg's)
    last_step: str = one_of("likelihood", ("likelihood", "ode"))  # with σ_y > 0: y's noise put back (likelihood_step)
    likelihood_iters: int = bounded(50, 1, 10000)  # CG iterations of likelihood_step where H has no SVD
    init: str = one_of("noise", ("noise", "inversion"))  # EXPERIMENTAL "inversion": see inverted_start
    init_invert_t: int = bounded(100, 1, 999)   # with init = inversion: invert down to here, re-noise to k_start


def inverted_start(prior, op, y, cfg, *, c, uc, generator=None):
    """EXPERIMENTAL start in place of μ₀·H⁺y + σ₀·n: encode(A⁺y) inverted by RNRI (50 unshifted DDIM steps, the
    solver's text guidance) down to timestep cfg.init_invert_t, re-noised to the level of k_start."""
    inversion = InversionConfig(steps=50, cfg_guidance=cfg.cfg_guidance, official_shift=False)
    level = float(prior.alphas_cumprod[cfg.k_start])
    return measurement_start(prior, op, y, inversion, cfg.init_invert_t, level, c=c, uc=uc, generator=generator)


@dataclasses.dataclass
class CCIBasis:
    """Coordinates in which CCI's coefficients act elementwise: `split` x into parts, `join` them back; `r` holds
    s²/σ_y² per part (broadcast against split(x)): 0 = unmeasured, ∞ = measured without noise."""
    split: typing.Callable
    join: typing.Callable
    r: torch.Tensor
    y_part: torch.Tensor  # H⁺y in these coordinates (0 on the unmeasured parts)


def cci_basis(prior, op, h, like, y, sigma_y, generator):
    """Noiseless (σ_y = 0, or no SVD of H): the two parts x − Px and Px of the official split form, r = (0, ∞).
    Noisy with an SVD H = U S Vᵀ: ΠGDM's Hᵀ(HHᵀ + σ_y²/σ² I)⁻¹ is V diag(π) S⁺Uᵀ with π = rσ²/(rσ² + 1), so
    ΠGDM's noisy guided ODE is diagonal in x̄ = Vᵀx and its linear part is integrated exactly per singular value;
    as the steps grow this converges to ΠGDM's noisy ODE (tests: test_noisy_cci_converges_to_noisy_pigdm). It is
    not the official N-C-ΠGDM (c-pigdm cpgdm.py:243-534), which integrates a different ODE, first order in σ_y²
    (with (HᵀH)⁺ = V S⁻² Vᵀ): its correction shrinks like σ_y² where ΠGDM's noise effect shrinks like σ_y, so it
    does not converge to ΠGDM's noisy ODE. This form is the better founded of the two."""
    spectral = None
    if sigma_y > 0 and not isinstance(h, LatentSurrogate):
        try:
            spectral = h.svd(like)
        except (AttributeError, ValueError):
            warnings.warn("cci: this operator has no SVD here, so y's noise is not modelled (noiseless C-ΠGDM)")
    elif sigma_y > 0:
        warnings.warn("cci: the Stable Diffusion surrogate has no SVD, so y's noise is not modelled (noiseless C-ΠGDM)")
    if spectral is None:
        P = projector(h)
        hy = P(_measurement_inverse(prior, op, h, y, generator))

        def split(x):
            px = P(x)
            return torch.stack([x - px, px])
        r = torch.tensor([0.0, math.inf], dtype=torch.float64, device=y.device).view(2, *[1] * like.dim())
        return CCIBasis(split, lambda parts: parts.sum(0), r, split(hy))
    s = spectral.singulars.double()
    y_part = torch.where(s > 0, spectral.Ut(y.double()) / s, torch.zeros_like(s))  # S⁺Uᵀy = Vᵀ H⁺y
    return CCIBasis(lambda x: spectral.Vt(x.double()), spectral.V, s ** 2 / sigma_y ** 2, y_part)


def cci_table(b_levels, w, r):
    """For each level b of `b_levels` and each r (tensor): π, the integrating factor E(b) = exp(½b − ½w∫₀^b π) and
    Φ_y, Φ_s, Φ_j = ∫₀^b of φ_y = −½wμπE, φ_s = ½E(1/σ − wσπ), φ_j = ½wμσE (the coefficients of H⁺y, ε̂ and
    (∂ε̂/∂x)ᵀm in x̄ = E·x). r = 0 and r = ∞ take the closed forms of `cci_coefficients`, any other r the
    quadrature of `_noisy_coefficients`. Returns {key: [a tensor shaped like r per level]}."""
    values, where = torch.unique(r.double().cpu(), return_inverse=True)
    finite = (values > 0) & torch.isfinite(values)
    columns = torch.zeros(5, len(b_levels), len(values), dtype=torch.float64)
    for n, b in enumerate(b_levels):
        c = cci_coefficients(b, w)
        unmeasured = (0.0, math.exp(b / 2), 0.0, c["s1"], c["j1"])  # π = 0: DDIM's x/μ
        noiseless = (1.0, math.exp(-b / 2) ** (w - 1), c["y"], c["s1"] + c["s2"], c["j1"] + c["j2"])  # π = 1
        columns[:, n, values == 0] = torch.tensor(unmeasured, dtype=torch.float64)[:, None]
        columns[:, n, torch.isinf(values)] = torch.tensor(noiseless, dtype=torch.float64)[:, None]
    if finite.any():
        columns[:, :, finite] = _noisy_coefficients(b_levels, w, values[finite])
    return {key: [level[where].to(r.device) for level in rows]
            for key, rows in zip(("pi", "E", "y", "s", "j"), columns)}


def _noisy_coefficients(b_levels, w, r, nodes=12):
    """(5, len(b_levels), len(r)) float64: π, E, Φ_y, Φ_s, Φ_j of cci_table for 0 < r < ∞. ∫π has a closed form;
    Φ is composite Gauss–Legendre in u = √b (smooth at b = 0, where 1/σ ~ 1/u) on panels that halve towards 0
    down to 2⁻⁴⁰ of the top, so that π's step at σ² ≈ 1/r is resolved at any r."""
    r = r.double()
    roots = sorted({math.sqrt(b) for b in b_levels})
    edges = torch.tensor(sorted({0.0, *roots, *(roots[-1] * 2.0 ** -j for j in range(41))}), dtype=torch.float64)
    x, weight = (torch.from_numpy(a) for a in numpy.polynomial.legendre.leggauss(nodes))
    lo, hi = edges[:-1, None], edges[1:, None]
    u = (lo + hi) / 2 + (hi - lo) / 2 * x  # (panels, nodes)
    weight = (hi - lo) / 2 * weight * 2 * u  # db = 2u du
    at = [int(torch.searchsorted(edges, math.sqrt(b))) for b in b_levels]  # the edge of each level
    b, levels = u * u, torch.tensor(b_levels, dtype=torch.float64)
    mu, sigma = torch.exp(-b / 2), torch.sqrt(-torch.expm1(-b))

    def pi_and_exponent(r, b):
        """π = rσ²/(rσ² + 1) and ½b − ½w∫₀^b π, with ∫₀^b π = b − log(1 + (1 + r)(e^b − 1))/(1 + r)."""
        sig2 = -torch.expm1(-b)
        area = b - torch.log1p((1 + r) * torch.expm1(b)) / (1 + r)
        return r * sig2 / (r * sig2 + 1), b / 2 - w / 2 * area

    out = torch.empty(5, len(b_levels), len(r), dtype=torch.float64)
    chunk = max(1, 2 ** 22 // u.numel())  # values of r per pass: temporaries of ~32 MB
    for first in range(0, len(r), chunk):
        part = slice(first, first + chunk)
        pi, exponent = pi_and_exponent(r[part, None], levels)
        out[0, :, part], out[1, :, part] = pi.T, exponent.exp().T
        pi, exponent = pi_and_exponent(r[part, None, None], b)
        E = exponent.exp()
        for row, f in zip((2, 3, 4), (-0.5 * w * mu * pi * E, 0.5 * E * (1 / sigma - w * sigma * pi),
                                      0.5 * w * mu * sigma * E)):
            panels = (f * weight).sum(-1)
            at_edges = torch.cat([torch.zeros_like(panels[:, :1]), panels.cumsum(-1)], dim=1)
            out[row, :, part] = at_edges[:, at].T
    return out


@torch.no_grad()
def cci(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    if cfg.sigma_y is None:
        raise ConfigError("cci: sigma_y is not set (solve.py sets it to the task's noise_scale)")
    like = _latent_like(prior, op, y)
    h = latent_operator(prior, op, like, surrogate=True)
    P = projector(h)
    probe = P(randn(like.shape, torch.Generator().manual_seed(0), y.device).double())
    if (P(probe) - probe).norm() > 1e-6 * probe.norm():  # e.g. motion blur's CG pinv: Φ⁻¹ amplifies the error
        warnings.warn("cci: pinv∘A is not an exact projector for this operator; row-space errors grow by μ^-w")
    basis = cci_basis(prior, op, h, like, y, cfg.sigma_y, generator)
    ks = start_grid(cfg.k_start, cfg.steps)
    levels = [_levels(prior, k) for k in ks] + [_levels(prior, None)]
    # π, E and Φ at every grid level, once per solve (b = −2 log μ; b = 0 at the clean end)
    table = cci_table([-2 * math.log(mu) for mu, _ in levels], cfg.w, basis.r)
    c, uc = c.expand(len(y), -1, -1), uc.expand(len(y), -1, -1)

    # 1. warm start x = μ₀·H⁺y + σ₀·n; x̄ = E·x in the basis's parts (float64)
    mu, sigma = levels[0]
    if cfg.init == "inversion":
        x = inverted_start(prior, op, y, cfg, c=c, uc=uc, generator=generator).double()
    else:
        x = mu * basis.join(basis.y_part) + sigma * randn(like.shape, generator, y.device).double()
    x_bar = table["E"][0] * basis.split(x)
    for n, k in enumerate(ks):
        mu, sigma = levels[n]
        # 2. ε̂ (text CFG) and g = (∂ε̂/∂x)ᵀ m, m = sg(ΠGDM's Hᵀ(HHᵀ + σ_y²/σ² I)⁻¹(y − H x̂0)): one forward, one
        # backward through both CFG branches; noiseless, m = H⁺y − P x̂0
        with torch.enable_grad():
            xg = x.to(y.dtype).requires_grad_()
            eps = guided_eps(prior, xg, k, uc, c, cfg.cfg_guidance)
            x0 = (x - sigma * eps.detach().double()) / mu
            m = basis.join(table["pi"][n] * (basis.y_part - basis.split(x0)))
            g, = torch.autograd.grad(eps, xg, m.to(eps.dtype))
        eps, g = eps.detach().double(), g.double()
        width = conditional_variance(m, g, mu, sigma)  # z0's variance given x along m, for step 5
        # 3. exponential-integrator step with ε̂ and g frozen, the scalar coefficients integrated exactly: on the
        # unmeasured part DDIM plus the Jacobian term, on the measured parts a pull to H⁺y as E → 1
        d = {key: table[key][n + 1] - table[key][n] for key in ("y", "s", "j")}
        x_bar = x_bar + d["y"] * basis.y_part + d["s"] * basis.split(eps) + d["j"] * basis.split(g)
        # 4. back to x at the next level
        x = basis.join(x_bar / table["E"][n + 1])
        if callback:
            callback({"i": n, "steps": cfg.steps, "t": k, "z0": x0.to(y.dtype)})
    noisy = cfg.last_step == "likelihood" and cfg.sigma_y > 0
    if noisy and not isinstance(h, LatentSurrogate):
        # 5. y's noise put back along the exact H, with the width of z0 given the last level's x (likelihood_step)
        x = likelihood_step(prior, op, h, x, y, cfg.sigma_y, width, cfg.likelihood_iters, generator)
    x = prior.decode(x.to(y.dtype))
    if isinstance(h, LatentSurrogate):
        # Stable Diffusion (experimental): the surrogate H only approximates A∘decode, so finish with TReg's prox;
        # towards y + σ_y·n where y's noise is put back (towards y itself it fits the noise: 0.2 noise floors)
        target = y + cfg.sigma_y * randn(y.shape, generator, y.device).to(y) if noisy else y
        x = prox(op, x, target, cfg.cg_lamb, cfg.cg_iters)
    return x


# --- ΠGDM --------------------------------------------------------------------------------------------------------


def per_sample(c, like):
    """A float, or a (B,) tensor of one value per sample, shaped to broadcast against `like` (B, ...)."""
    return c.view(-1, *[1] * (like.dim() - 1)) if torch.is_tensor(c) and c.dim() else c


def gain_solver(h, like, cg_iters):
    """(r, c) ↦ (H Hᵀ + c I)⁻¹ r, c a float or one per sample (B,), as the guidance uses it (through Hᵀ, so the part of
    the result outside range(H) does not matter). With H's SVD: U (S² + c)⁻¹ Uᵀ r on the SVD's directions. Where that
    SVD is truncated (the Gaussian blur drops s below pinv_rtol = 3e-2 of the largest, and the analytic prior's M =
    A∘decode with it), the rest of r lies in a complement that HHᵀ maps into itself, and there (HHᵀ + cI) v = r is
    solved by CG on Q(HHᵀ + cI)Q, Q = I − UUᵀ, whose eigenvalues lie in [c, c + (3e-2·s_max)²]: exact to CG's tolerance
    unless c ≪ 1e-3·s_max² (50 iterations reach 1e-8 at c ≥ 1e-4·s_max²). With c = 0 (σ_y = 0) the truncated inverse,
    the same pseudo-inverse H⁺ as everywhere else here. Without an SVD: CG on HHᵀ + cI."""
    full = lambda u, c: h.A(h.At(u)) + per_sample(c, u) * u
    try:
        d = h.svd(like)
    except (AttributeError, ValueError):
        return lambda r, c: conjugate_gradient(lambda u: full(u, c), r, torch.zeros_like(r), cg_iters)
    s2 = d.singulars ** 2
    kept = lambda r: d.U(torch.where(s2 > 0, d.Ut(r), torch.zeros_like(s2)))  # U Uᵀ r on the SVD's directions
    probe = randn(h.A(like[:1]).shape, torch.Generator().manual_seed(0), like.device).to(like)
    truncated = (h.At(probe - kept(probe)).norm() > 1e-9 * h.At(probe).norm()).item()  # SR, inpainting: no

    def solve(r, c):
        inverse = torch.where(s2 > 0, 1 / (s2 + per_sample(c, s2[None])), torch.zeros_like(s2))
        v = d.U(inverse * d.Ut(r))
        if truncated and bool((torch.as_tensor(c) > 0).all()):
            rest = r - kept(r)
            deflated = lambda u: (lambda q: q - kept(q))(full(u - kept(u), c))
            tol = 1e-12 * rest.flatten(1).norm(dim=1)  # per sample: each solve as if alone in the batch
            v = v + conjugate_gradient(deflated, rest, torch.zeros_like(rest), cg_iters, tol)
        return v
    return solve


def pigdm_guidance(eps_fn, measure, solve, x, y, mu, sigma, sigma_y):
    """ε̂(x) and G = (∂x̂0/∂x)ᵀ Hᵀ (H Hᵀ + (σ_y/r)² I)⁻¹ (y − H x̂0), both float64, with x̂0 = (x − σε̂)/μ and
    r² = σ² = 1 − ᾱ: r²·∇_x log N(y; H x̂0(x), r² H Hᵀ + σ_y² I) with the covariance held fixed (ΠGDM eq. 8);
    and the variance of z0 given x along the guidance's direction (conditional_variance), for likelihood_step."""
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        eps = eps_fn(x)
        x0 = (x - sigma * eps) / mu
        seen = measure(x0)
        v = solve((y - seen).detach().to(seen.dtype), (sigma_y / sigma) ** 2)
        guidance, direction = torch.autograd.grad(seen, (x, x0), v)  # G and d = Hᵀv from one backward pass
    # G = (I − σ(∂ε̂/∂x)ᵀ)d/μ, so (∂ε̂/∂x)ᵀd = (d − μG)/σ: the conditional variance along d comes for free
    width = conditional_variance(direction, (direction.double() - mu * guidance.double()) / sigma, mu, sigma)
    return eps.detach().double(), guidance.double(), width


@dataclasses.dataclass
class PiGDMConfig:
    """ΠGDM (Song, Vahdat, Mardani, Kautz, ICLR 2023) as the CCI paper's continuous baseline: the ΠGDM-guided
    probability-flow ODE in x̄ = x/μ, ε̂ integrated exactly, the guidance by exponential Euler (G frozen over a step,
    its scalar weight integrated exactly). `weighting` is the guidance weight w_t on ∇log p(y|x):
    "pigdm" w_t = w·r_t², as the CCI repo's PGDMSampler (c-pigdm diffusion/algos/continuous/ode/pgdm.py:128-129,
    "Assuming w = rt**2", dx̄ = ½wβ·(1/μ)·G dt); "cpigdm" w_t = w·r_t²·μ_t², C-ΠGDM's convention (cpgdm.py), weaker
    by ᾱ (5.1× at k 566): the ODE that cci integrates, for comparing the two integrators."""
    steps: int = bounded(20, 1, 1000)           # NFE (CCI repo baseline_cont_pgdm.sh:17, num_steps 20)
    w: float = bounded(6.0, 0, 100)             # guidance weight (CCI repo baseline_cont_pgdm.sh:20, w 6)
    k_start: int = bounded(999, 1, 999)         # first timestep (measured, docs/solvers.md "Text that chooses")
    cfg_guidance: float = bounded(4.0, 0, 100)  # text CFG weight of ε̂ (project default); 0 = without text
    sigma_y: float | None = bounded(None, 0, 10)  # measurement noise std; None = the task's noise_scale
    cg_iters: int = bounded(50, 1, 10000)       # CG iterations for (H Hᵀ + (σ_y/r_t)² I)⁻¹ without an SVD
    weighting: str = one_of("pigdm", ("pigdm", "cpigdm"))  # w_t = w·r² (ΠGDM) or w·r²·μ² (C-ΠGDM's, cci's ODE)
    last_step: str = one_of("likelihood", ("likelihood", "ode"))  # with σ_y > 0: y's noise put back (likelihood_step)


@torch.no_grad()
def pigdm(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    if cfg.sigma_y is None:
        raise ConfigError("pigdm: sigma_y is not set (solve.py sets it to the task's noise_scale)")
    like = _latent_like(prior, op, y)
    h = latent_operator(prior, op, like)
    if h is None:  # Stable Diffusion: H = A∘decode, differentiated through the decoder; (A Aᵀ + c I)⁻¹ in pixels
        measure, solve = (lambda z: op.A(prior.decode(z))), gain_solver(op, op.At(y), cfg.cg_iters)
    else:
        measure, solve = h.A, gain_solver(h, like, cfg.cg_iters)
    ks = start_grid(cfg.k_start, cfg.steps)
    levels = [_levels(prior, k) for k in ks] + [_levels(prior, None)]
    c, uc = c.expand(len(y), -1, -1), uc.expand(len(y), -1, -1)

    # 1. warm start x = μ₀·H⁺y + σ₀·n, as CCI
    mu, sigma = levels[0]
    x = mu * _measurement_inverse(prior, op, h, y, generator) + sigma * randn(like.shape, generator, y.device).double()
    for n, k in enumerate(ks):
        mu, sigma = levels[n]
        # 2. ε̂ (text CFG) and the ΠGDM guidance, one vector–Jacobian product through the model (and decoder)
        eps_fn = lambda x_: guided_eps(prior, x_, k, uc, c, cfg.cfg_guidance)
        eps, guidance, width = pigdm_guidance(eps_fn, measure, solve, x.to(y.dtype), y, mu, sigma, cfg.sigma_y)
        x0 = (x - sigma * eps) / mu
        # 3. x̄ = x/μ: x̄ += Δρ·ε̂ + w·ΔW·G, then x = μ'·x̄. In b = −log ᾱ (db = −β dt backwards) the guidance
        # term is ½w·e^{b/2}·G db for w_t = w·r² and ½w·e^{−b/2}·G db for w·r²·μ²; ε̂ and G frozen, so
        # ΔW = 1/μ − 1/μ' (ΠGDM) or μ' − μ (C-ΠGDM's weighting)
        mu_next, sigma_next = levels[n + 1]
        weight = 1 / mu - 1 / mu_next if cfg.weighting == "pigdm" else mu_next - mu
        x_bar = x / mu + (sigma_next / mu_next - sigma / mu) * eps + cfg.w * weight * guidance
        x = mu_next * x_bar
        if callback:
            callback({"i": n, "steps": cfg.steps, "t": k, "z0": x0.to(y.dtype)})
    if cfg.last_step == "likelihood" and cfg.sigma_y > 0:
        # 4. y's noise put back along H (on Stable Diffusion the linearised A∘decode), with the width of z0 given
        # the last level's x (likelihood_step)
        x = likelihood_step(prior, op, h, x, y, cfg.sigma_y, width, cfg.cg_iters, generator)
    return prior.decode(x.to(y.dtype))


# --- DDRM --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DDRMConfig:
    """DDRM (Kawar, Elad, Ermon, Song, NeurIPS 2022): DDIM in the spectral basis of H = U S Vᵀ, each coefficient
    treated by whether it is unmeasured, or measured with less or more noise than the current level. The boundary
    s·σ' = σ_y goes to the anchored case, as in the paper's eq. 4 (σ_t s_i ≥ σ_y); the official code's strict
    inequalities (ddrm functions/denoising.py:74-75) send it to the unmeasured case instead. That differs only at
    σ_y = 0 on the last step (σ' = 0): there this returns ȳ = S⁺Uᵀy on the measured coefficients (η_b = 1: A x = y
    exactly), the official code x̂0's (the Tweedie estimate, off y by the model's error)."""
    steps: int = bounded(20, 1, 1000)           # DDRM paper (20 steps, the NFE of its main results)
    eta: float = bounded(0.85, 0, 1)            # η: DDRM paper
    eta_b: float = bounded(1.0, 0, 1)           # η_b: DDRM paper
    cfg_guidance: float = bounded(4.0, 0, 100)  # text CFG weight of ε̂ (project default; DDRM has no text)
    sigma_y: float | None = bounded(None, 0, 10)  # measurement noise std; None = the task's noise_scale


@torch.no_grad()
def ddrm(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    if cfg.sigma_y is None:
        raise ConfigError("ddrm: sigma_y is not set (solve.py sets it to the task's noise_scale)")
    like = _latent_like(prior, op, y)
    h = latent_operator(prior, op, like)
    if h is None:
        raise ConfigError("ddrm needs the measurement as a linear map of the diffusion variable: use a pixel "
                          "prior or the analytic prior (Stable Diffusion's decoder is nonlinear)")
    try:
        d = h.svd(like)
    except (AttributeError, ValueError) as err:
        raise ConfigError(f"ddrm needs an SVD of the operator: {err}") from None
    s, sigma_y = d.singulars, cfg.sigma_y
    y_bar = torch.where(s > 0, d.Ut(y.double()) / s, torch.zeros_like(s))  # S⁺Uᵀy
    noise_of_y = torch.where(s > 0, sigma_y / s, torch.full_like(s, math.inf))  # σ_y/s_i: y's noise per coefficient
    skip = len(prior.alphas_cumprod) // cfg.steps
    ks = [skip * i for i in reversed(range(cfg.steps))]  # DDRM's uniform grid 950, 900, …, 0 for 20 steps
    c, uc = c.expand(len(y), -1, -1), uc.expand(len(y), -1, -1)

    x = randn(like.shape, generator, y.device).double()  # x_T ~ N(0, I); ᾱ_950 ≈ 0 makes ȳ's share negligible
    for n, k in enumerate(ks):
        a = float(prior.alphas_cumprod[k].double())
        a_next = float(prior.alphas_cumprod[ks[n + 1]].double()) if n + 1 < cfg.steps else 1.0
        # 1. ε̂ (text CFG) and x̂0, in the spectral basis; s_next = √(1−ᾱ')/√ᾱ' is the next noise level of x/√ᾱ
        eps = guided_eps(prior, x.to(y.dtype), k, uc, c, cfg.cfg_guidance).double()
        x0 = tweedie(x, eps, a)
        x0_bar, eps_bar = d.Vt(x0), d.Vt(eps)
        noise = randn(x0_bar.shape, generator, y.device).double()
        s_next = ((1 - a_next) / a_next) ** 0.5
        keep = (1 - cfg.eta ** 2) ** 0.5 * s_next
        # 2. unmeasured (s = 0): DDIM with η
        unmeasured = x0_bar + keep * eps_bar + cfg.eta * s_next * noise
        # 3. measured with more noise than the next level (s_next < σ_y/s): move towards ȳ by the ratio
        pulled = x0_bar + keep * (y_bar - x0_bar) / noise_of_y + cfg.eta * s_next * noise
        # 4. measured with less noise (s_next ≥ σ_y/s): ȳ (weight η_b) plus the noise y lacks
        missing = (s_next ** 2 - (cfg.eta_b * noise_of_y.clamp(max=1e30)) ** 2).clamp(min=0) ** 0.5  # no 0·∞ at s = 0
        anchored = (1 - cfg.eta_b) * x0_bar + cfg.eta_b * y_bar + missing * noise
        x_bar = torch.where(s == 0, unmeasured, torch.where(s_next < noise_of_y, pulled, anchored))
        x = a_next ** 0.5 * d.V(x_bar)
        if callback:
            callback({"i": n, "steps": cfg.steps, "t": k, "z0": x0.to(y.dtype)})
    return prior.decode(x.to(y.dtype))
