"""A particle sampler, with the signature of treg.solvers.latent:

    fn(prior, op, y, cfg, *, c, uc, generator=None, callback=None) -> x    # (B,3,H,W) in [-1,1]

    TDS  Wu, Trippe, Naesseth, Blei, Cunningham, "Practical and Asymptotically Exact Conditional Sampling in
         Diffusion Models", NeurIPS 2023, arXiv 2306.17775; official code github.com/blt2114/twisted_diffusion_sampler
         (image_exp/, at 831c8e6), cited below as "official".
    TDS-SVD  ours: TDS in the spectral basis of H = A∘decode, with the Gaussian parts (twist, kernel, proposal)
         exact, after MCGdiff's use of H's SVD (Cardoso, Janati, Le Corff, Moulines, ICLR 2024).
"""
import dataclasses
import math

import torch

from treg.config import ConfigError, bounded, one_of
from treg.diffusion import guided_eps, randn, schedule, tweedie
from treg.latent_ops import latent_operator


@dataclasses.dataclass
class TDSConfig:
    """The twisted diffusion sampler (Wu et al., NeurIPS 2023): sequential Monte Carlo over the DDPM chain with the
    Tweedie twist. Defaults: the official image code where it has one (configs/solver/tds.yaml cites each)."""
    particles: int = bounded(16, 1, 100000)      # N per measurement
    steps: int = bounded(100, 1, 999)            # DDPM ancestral steps (999: 1000 would repeat t = 999, a no-op)
    cfg_guidance: float = bounded(0.0, 0, 100)   # w of ε̂; 0 = null text only (the chain's prior is then exact)
    sigma_y: float | None = bounded(None, 0, 10)  # y's noise std in the twist and the final likelihood; None = task's
    tausq: float | None = bounded(0.12, 0, 1e6, low_open=True)  # τ² of r_t² = σ̄_t²τ²/(σ̄_t² + τ²); None: r_t² = σ̄_t²
    resample_threshold: float = bounded(1.0, 0, 1)  # resample where ESS < threshold·N (1: whenever weights differ)
    resampling: str = one_of("systematic", ("systematic", "multinomial"))


def _uniform(shape, generator, device):
    """U[0, 1) draws as treg.diffusion.randn draws normals: one generator, or one per row."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([_uniform((1, *shape[1:]), g, device) for g in generator])
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def resample_indices(log_w, kind, generator, count=None):
    """(B, count) ancestor indices (count = N by default) within each measurement's particles, by inverse CDF of the
    normalised weights at positions (u + i)/N with one u per measurement (systematic) or at independent uniforms
    (multinomial)."""
    b, n = log_w.shape
    if kind == "systematic":
        positions = (_uniform((b, 1), generator, log_w.device).to(log_w) + torch.arange(n).to(log_w)) / n
    else:
        positions = _uniform((b, count or n), generator, log_w.device).to(log_w)
    cdf = torch.softmax(log_w, dim=1).cumsum(1)
    return torch.searchsorted(cdf, positions.contiguous()).clamp(max=n - 1)


def ess(log_w):
    """Effective sample size (Σw)²/Σw² per measurement, (B,), from log-weights (B, N)."""
    return torch.exp(2 * torch.logsumexp(log_w, 1) - torch.logsumexp(2 * log_w, 1))


def adaptive_resample(log_w, threshold, kind, generator):
    """TDS's step (1) for log-weights (B, N): resample within each measurement whose ESS < threshold·N. The uniforms
    are drawn on every step, so that an image's draws do not depend on whether the others of its batch resample.
    Returns the ESS before (B,), which measurements resampled (B,), the flat ancestor of each of the B·N particles
    (itself where its measurement did not resample) and the log-weights after (0 where resampled)."""
    b, n = log_w.shape
    current = ess(log_w)
    resampled = current < threshold * n
    ancestors = resample_indices(log_w, kind, generator)
    idx = torch.where(resampled[:, None], ancestors, torch.arange(n, device=log_w.device))
    flat = (idx + n * torch.arange(b, device=log_w.device)[:, None]).flatten()
    return current, resampled, flat, torch.where(resampled[:, None], torch.zeros_like(log_w), log_w)


def gaussian_log_lik(y, y_hat, var):
    """log N(y; ŷ, var·I) per image, (B,)."""
    m = y[0].numel()
    return -0.5 * (y - y_hat).flatten(1).pow(2).sum(1) / var - 0.5 * m * math.log(2 * math.pi * var)


def ddpm_posterior(z, z0, a, a_prev):
    """Mean and variance of q(z_t' | z_t, ẑ0) for the step ᾱ → ᾱ' (Ho et al. 2020, eq. 7, with α = ᾱ/ᾱ')."""
    beta = 1 - a / a_prev
    mean = a_prev ** 0.5 * beta / (1 - a) * z0 + (a / a_prev) ** 0.5 * (1 - a_prev) / (1 - a) * z
    return mean, beta * (1 - a_prev) / (1 - a)


@torch.no_grad()
def tds(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    """TDS, Algorithm 1 of arXiv 2306.17775, on the DDPM chain of our `schedule` (t, ᾱ_t, ᾱ_t'; no TReg shift, so
    the levels are the model's), N particles per measurement batched as (B·N, ...):

        twist   p̃_t(y | z_t) = N(y; A D(ẑ0(z_t)), (σ_y² + r_t²) I),  ẑ0 Tweedie from the CFG ε̂ (guided_eps),
                r_t² = σ̄_t²τ²/(σ̄_t² + τ²), σ̄_t² = (1−ᾱ_t)/ᾱ_t (official get_xstart_var type 6, τ² = 0.12, the
                run_image.py default; tausq None is its type 1, r_t² = σ̄_t²)
        (0)     z_T ~ N(0, I), log w = log p̃_T(y | z_T)
        (1)     resample within each measurement where ESS < threshold·N (log w then 0)
        (2)     proposal q(z_t' | z_t, y) = N(μ + β̃·∇ log p̃_t(y | z_t), β̃I) around the DDPM kernel
                p(z_t' | z_t) = N(μ(ẑ0), β̃I) of Ho et al.: the paper's proposal, its variance times (score + twist
                gradient) added to the mean (§3, Algorithm 1, read, not replayed), ∇ by autograd through ε̂, D and A
        (3)     log w += log p(z_t' | z_t) + log p̃_t'(y | z_t') − log q(z_t' | z_t, y) − log p̃_t(y | z_t)
        (4)     after the last level: z_0 = ẑ0(z_t), the untwisted DDPM last step's mean (Ho et al. §3.3; official
                use_mean_pred), log w += log p(y | D(z_0)) − log p̃_t(y | z_t), exact likelihood N(y; A D(z_0), σ_y²)

    Returns D(z_0) of one particle per measurement drawn from its final weights (by the generator).

    Why TDS. MCGdiff and FPS are exact too, but need y linear in the diffusion variable and the SVD of that map, which
    a latent prior's decoder breaks; TDS needs only a differentiable twist, so this one function runs on pixel priors,
    the analytic latent prior and (EXPERIMENTAL: through the VAE decoder, untested beyond plumbing) Stable Diffusion.
    It is consistent as N → ∞ for the target p_chain(z_0:T)·p(y | z_0): the posterior under the chain, which is the
    exact posterior only as far as the chain's z_0 law is the prior (discretisation, CFG at w ∉ {0, 1}).

    Not the official code's choices: it moves ẑ0 by (1−ᾱ)/√ᾱ·∇ (the mean by β/√α·∇, β = 1 − ᾱ/ᾱ'), which at
    coarse steps near the end, where β̃ ≪ β, shifts the mean by many kernel widths and collapses the weights (a
    Gaussian inpainting bed at 20 steps, measured while writing this: final ESS 1.4 of 64, 6.3 with β̃); it clamps
    that ẑ0 to [−1, 1] (latents are not images); it uses a learned variance (our priors have none:
    β̃ = β(1−ᾱ')/(1−ᾱ), the DDPM "fixed small" one).

    The callback gets z (the particles before (1)), z0, eps, log_w (B, N) before (1), ess (B,), resampled (B,) and
    resamples (B,) so far; at the last step after (4), with the final ESS.
    """
    if cfg.sigma_y is None:
        raise ConfigError("tds: sigma_y is not set (solve.py sets it to the task's noise_scale)")
    if cfg.sigma_y <= 0:
        raise ConfigError("tds: sigma_y must be > 0: the exact likelihood N(y; A D(z_0), σ_y²) needs noise")
    b, n = y.shape[0], cfg.particles
    shape = (prior.latent_channels, *(s // prior.vae_scale_factor for s in op.At(y).shape[-2:]))
    z = randn((b, n, *shape), generator, y.device).to(y.dtype).flatten(0, 1)  # particle j of image i at i·N + j
    ys = y.repeat_interleave(n, 0)
    c, uc = (e.expand(b * n, -1, -1) if len(e) == 1 else e.repeat_interleave(n, 0) for e in (c, uc))  # a view for one

    def twist(z, t, a):
        """ε̂, ẑ0, log p̃_t(y | z_t) (B·N,) and its gradient in z_t."""
        r2 = (1 - a) / a if cfg.tausq is None else (1 - a) / a * cfg.tausq / ((1 - a) / a + cfg.tausq)
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
            z0 = tweedie(z, eps, a)
            log_twist = gaussian_log_lik(ys, op.A(prior.decode(z0)), cfg.sigma_y ** 2 + r2)
            grad, = torch.autograd.grad(log_twist.sum(), z)
        return eps.detach(), z0.detach(), log_twist.detach(), grad

    plan = schedule(prior.alphas_cumprod, cfg.steps, official_shift=False)
    log_w = torch.zeros(b, n, dtype=torch.float64, device=y.device)
    resamples = torch.zeros(b, dtype=torch.long, device=y.device)
    for i, (t, a, a_prev) in enumerate(plan):
        eps, z0, log_twist, grad = twist(z, t, a)
        # (0) / (3): the twist's part of the incremental weight (the kernels' part was added at the proposal)
        log_w += (log_twist - (log_prev if i else 0)).view(b, n).double()
        info = {"i": i, "steps": cfg.steps, "t": t, "z": z, "z0": z0, "eps": eps, "log_w": log_w.clone()}
        if i == len(plan) - 1:
            break
        # (1) adaptive resampling, every per-particle quantity gathered with its particle
        current, resampled, flat, log_w = adaptive_resample(log_w, cfg.resample_threshold, cfg.resampling, generator)
        if resampled.any():
            z, z0, log_twist, grad = z[flat], z0[flat], log_twist[flat], grad[flat]
            resamples += resampled
        # (2) the twisted DDPM proposal, and (3)'s kernel ratio p/q at the draw
        mean, var = ddpm_posterior(z, z0, a, a_prev)
        mean_twisted = mean + var * grad
        z = mean_twisted + var ** 0.5 * randn((b, n, *shape), generator, y.device).to(z).flatten(0, 1)
        log_p_over_q = ((z - mean_twisted).pow(2) - (z - mean).pow(2)).flatten(1).sum(1) / (2 * var)
        log_w += log_p_over_q.view(b, n).double()
        log_prev = log_twist
        if callback:
            callback(info | {"ess": current, "resampled": resampled, "resamples": resamples.clone()})
    # (4) the last step's mean and the exact likelihood in place of the twist
    x0 = prior.decode(z0)
    log_w += (gaussian_log_lik(ys, op.A(x0), cfg.sigma_y ** 2) - log_twist).view(b, n).double()
    final = ess(log_w)
    if callback:
        callback(info | {"log_w": log_w.clone(), "ess": final, "resampled": torch.zeros_like(final, dtype=torch.bool),
                         "resamples": resamples.clone()})
    pick = resample_indices(log_w, "multinomial", generator, count=1)[:, 0]
    return x0.view(b, n, *x0.shape[1:])[torch.arange(b, device=y.device), pick]


@dataclasses.dataclass
class TDSSVDConfig:
    """TDS with H = A∘decode's SVD (ours, after Wu et al. 2023 and the MCGdiff idea of Cardoso et al. 2024): the
    twist, the kernel and the proposal are Gaussian in H's spectral basis. Defaults: configs/solver/tds-svd.yaml."""
    particles: int = bounded(16, 1, 100000)      # N per measurement
    steps: int = bounded(50, 1, 999)             # ancestral steps; the last one goes to the clean level ᾱ = 1
    cfg_guidance: float = bounded(0.0, 0, 100)   # w of ε̂; 0 = null text only (the chain's prior is then exact)
    sigma_y: float | None = bounded(None, 0, 10)  # y's noise std; None = the task's noise_scale
    tausq: float = bounded(0.01, 0, 1e6, low_open=True)  # τ²: the kernel's and twist's prior variance behind c(ᾱ)
    resample_threshold: float = bounded(1.0, 0, 1)  # resample where ESS < threshold·N (1: whenever weights differ)
    resampling: str = one_of("systematic", ("systematic", "multinomial"))


def tweedie_variance(a, tausq):
    """c(ᾱ) = Var[z_0 | z_t] and the gain g(ᾱ) = ∂E[z_0 | z_t]/∂z_t for a prior N(μ, τ²I) at the level ᾱ:
    c = (1−ᾱ)τ²/(ᾱτ² + 1−ᾱ), g = √ᾱτ²/(ᾱτ² + 1−ᾱ). At ᾱ = 1: (0, 1)."""
    denominator = a * tausq + 1 - a
    return (1 - a) * tausq / denominator, a ** 0.5 * tausq / denominator


@torch.no_grad()
def tds_svd(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    """TDS (Algorithm 1 of arXiv 2306.17775) in the spectral basis of H = A∘decode = U S Vᵀ, where everything that is
    Gaussian is written exactly (ours). Spectral coordinates: v̄ = Vᵀz, ȳ = Uᵀy (measured where s_i > 0); one model
    call per particle and level, no autograd.

        c(ᾱ), g(ᾱ)  the variance of z_0 given z_t and the slope of Tweedie's ẑ0, under a Gaussian prior of variance τ²
                    (tweedie_variance; exact for that prior, an assumption otherwise)
        kernel      p(z_t' | z_t) = N(μ(ẑ0), (β̃ + b²c(ᾱ_t)) I), μ and β̃ the DDPM posterior q(z_t' | z_t, ẑ0) of
                    Ho et al. eq. 7, b its coefficient on ẑ0: the reverse kernel that integrates ẑ0's uncertainty
                    (the Gaussian-exact form of Analytic-DPM, Bao et al. ICLR 2022). Levels: our `schedule` of
                    `steps` with the last step's ᾱ' set to 1, where the kernel's variance is c and ẑ0(z_0) = z_0
        twist       p̃_t(y | z_t) = Π_{s_i>0} N(ȳ_i; s_i·ẑ0̄_i, σ_y² + c(ᾱ_t)s_i²): the exact p(y | z_t) for that prior,
                    the exact likelihood N(y; A D(z_0), σ_y²) at ᾱ = 1
        (0)         z_T ~ N(0, I), log w = log p̃_T(y | z_T)
        (1)         resample within each measurement where ESS < threshold·N (log w then 0)
        (2)         proposal: per measured coordinate, the product of the kernel N(m_i, v) with the twist at ᾱ'
                    linearised as ẑ0̄'_i ≈ ẑ0̄_i + g(ᾱ')(v̄'_i − m_i) (exact for the Gaussian prior, where
                    E[ẑ0(z_t') | z_t] = ẑ0(z_t)): N(μq_i, 1/P_i) with
                    P_i = 1/v + s_i²g'²/r_i, μq_i = (m_i/v + s_i g'(ȳ_i − s_i ẑ0̄_i + s_i g' m_i)/r_i)/P_i,
                    r_i = σ_y² + c(ᾱ')s_i²; the null space keeps the kernel
        (3)         log w += log p(z_t' | z_t) − log q(z_t' | z_t, y) + log p̃_t'(y | z_t') − log p̃_t(y | z_t),
                    the twist at z_t' with the model's ẑ0 (not the linearisation), so the weights are exact

    Under a Gaussian prior of variance τ² the proposal is the exact conditional and the weights stay flat after the
    first resampling (tested); otherwise the weights correct the Gaussian assumption, and the sampler targets
    p_chain(z_0:T)·p(y | z_0) as N → ∞ like TDS. τ² enters the kernel, so it is part of that chain: the last
    kernel's variance c(ᾱ_1) should be the prior's spread around ẑ0 at the last level (its modes' width), or the
    null space comes out too wide or too narrow whatever N (configs/solver/tds-svd.yaml). It needs H's full
    orthogonal V: pixel priors with an SVD (SR, inpainting; Gaussian blur's is rank-truncated, so its likelihood is
    too) and linear decoders up to treg.latent_ops.DENSE_LIMIT latent values. Not Stable Diffusion (A∘decode is
    nonlinear), not motion blur.

    Returns D(z_0) of one particle per measurement drawn from its final weights. The callback gets what tds's gets.
    """
    if cfg.sigma_y is None:
        raise ConfigError("tds-svd: sigma_y is not set (solve.py sets it to the task's noise_scale)")
    if cfg.sigma_y <= 0:
        raise ConfigError("tds-svd: sigma_y must be > 0: the exact likelihood N(y; A D(z_0), σ_y²) needs noise")
    b, n = y.shape[0], cfg.particles
    shape = (prior.latent_channels, *(s // prior.vae_scale_factor for s in op.At(y).shape[-2:]))
    like = torch.zeros(1, *shape, dtype=torch.float64, device=y.device)
    h = latent_operator(prior, op, like)
    try:
        d = h.svd(like) if h is not None and hasattr(h, "svd") else None
    except ValueError as err:
        raise ConfigError(f"tds-svd needs the SVD of A∘decode: {err}") from None
    if d is None:
        raise ConfigError("tds-svd needs the SVD of A∘decode: this prior's decoder is nonlinear (Stable Diffusion) "
                          "or this operator has no SVD (motion blur); use tds")
    s = d.singulars.to(torch.float64)
    measured = s > 0
    y_bar = d.Ut(y.double()).repeat_interleave(n, 0)
    spectral = y_bar.shape[1:]
    z = randn((b, n, *shape), generator, y.device).to(y.dtype).flatten(0, 1)  # particle j of image i at i·N + j
    c, uc = (e.expand(b * n, -1, -1) if len(e) == 1 else e.repeat_interleave(n, 0) for e in (c, uc))

    def log_twist(z0_bar, variance):
        """Σ_{s_i>0} log N(ȳ_i; s_i z̄0_i, σ_y² + variance·s_i²) per particle, (B·N,)."""
        r = cfg.sigma_y ** 2 + variance * s ** 2
        terms = -0.5 * (y_bar - s * z0_bar) ** 2 / r - 0.5 * torch.log(2 * math.pi * r)
        return torch.where(measured, terms, torch.zeros_like(terms)).flatten(1).sum(1)

    plan = schedule(prior.alphas_cumprod, cfg.steps, official_shift=False)
    plan[-1] = (*plan[-1][:2], 1.0)
    log_w = torch.zeros(b, n, dtype=torch.float64, device=y.device)
    resamples = torch.zeros(b, dtype=torch.long, device=y.device)
    for i, (t, a, a_prev) in enumerate(plan):
        eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
        z0 = tweedie(z, eps, a)
        z0_bar = d.Vt(z0.double())
        twist = log_twist(z0_bar, tweedie_variance(a, cfg.tausq)[0])
        # (0) / (3): the twist's part of the incremental weight (the kernels' part was added at the proposal)
        log_w += (twist - (log_prev if i else 0)).view(b, n)
        info = {"i": i, "steps": cfg.steps, "t": t, "z": z, "z0": z0, "eps": eps, "log_w": log_w.clone()}
        # (1) adaptive resampling, as tds
        current, resampled, flat, log_w = adaptive_resample(log_w, cfg.resample_threshold, cfg.resampling, generator)
        if resampled.any():
            z, z0, z0_bar, twist = z[flat], z0[flat], z0_bar[flat], twist[flat]
            resamples += resampled
        # (2) the conjugate proposal in the spectral basis, (3)'s kernel ratio p/q at the draw
        mean, tilde = ddpm_posterior(z.double(), z0.double(), a, a_prev)
        gain_z0 = a_prev ** 0.5 * (1 - a / a_prev) / (1 - a)
        v = tilde + gain_z0 ** 2 * tweedie_variance(a, cfg.tausq)[0]
        c_next, g_next = tweedie_variance(a_prev, cfg.tausq)
        m = d.Vt(mean)
        r = cfg.sigma_y ** 2 + c_next * s ** 2
        precision = torch.where(measured, 1 / v + (s * g_next) ** 2 / r, torch.full_like(s, 1 / v))
        mu = (m / v + torch.where(measured, s * g_next * (y_bar - s * (z0_bar - g_next * m)) / r, 0.0)) / precision
        draw = mu + precision ** -0.5 * randn((b, n, *spectral), generator, y.device).double().flatten(0, 1)
        log_p_over_q = (-0.5 * (draw - m) ** 2 / v + 0.5 * precision * (draw - mu) ** 2
                        - 0.5 * torch.log(precision * v))
        log_w += torch.where(measured, log_p_over_q, torch.zeros_like(log_p_over_q)).flatten(1).sum(1).view(b, n)
        z = d.V(draw).to(y.dtype)
        log_prev = twist
        if callback:
            callback(info | {"ess": current, "resampled": resampled, "resamples": resamples.clone()})
    # the clean level: the twist is the exact likelihood, ẑ0(z_0) = z_0
    log_w += (log_twist(d.Vt(z.double()), 0.0) - log_prev).view(b, n)
    final = ess(log_w)
    if callback:
        callback(info | {"i": len(plan), "z": z, "log_w": log_w.clone(), "ess": final,
                         "resampled": torch.zeros_like(final, dtype=torch.bool), "resamples": resamples.clone()})
    x0 = prior.decode(z)
    pick = resample_indices(log_w, "multinomial", generator, count=1)[:, 0]
    return x0.view(b, n, *x0.shape[1:])[torch.arange(b, device=y.device), pick]
