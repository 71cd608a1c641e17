"""Inverse solvers on a latent prior. One function per method, each with its config dataclass right above it.

Every solver has the signature

    fn(prior, op, y, cfg, *, c, uc, generator=None, callback=None) -> x    # (B,3,H,W) in [-1,1]

with `y` the (B, ...) measurement of `op`, `c`/`uc` the prompt and null-prompt embeddings ((1 or B), L, D),
`generator` one torch.Generator or one per batch element, and `callback(info: dict)` called after every step with
at least i, steps, t and the Tweedie estimate z0 (treg and psld add the step's input latent z and its ε̂).
Solvers do no I/O. The loops share the small helpers in treg.diffusion and treg.linalg, not a base class.
"""
import dataclasses
import math

import torch

from treg.config import bounded, one_of
from treg.diffusion import ddim_step, guided_eps, randn, schedule, timesteps, tweedie
from treg.linalg import prox
from treg.solvers.inversion import warm_start


def _start(prior, op, y, c, uc, generator):
    """Initial noise z_T for the image size of `op`, and the embeddings broadcast to the batch."""
    b, _, h, w = op.At(y).shape
    f = prior.vae_scale_factor
    z = randn((b, prior.latent_channels, h // f, w // f), generator, y.device)
    return z, c.expand(b, -1, -1), uc.expand(b, -1, -1)


def residual_norm(op, y, x):
    """Per-image data residual ‖y − A x‖₂, shape (B,)."""
    return (y - op.A(x)).flatten(1).norm(dim=1)


def tweedie_gradient(prior, z, a, eps_fn, loss_fn):
    """ε̂, ẑ0 and ∇_z Σ_b loss_fn(ẑ0, D(ẑ0))_b for a per-image loss (B,): the gradient flows through the noise
    prediction `eps_fn(z)` and the VAE decoder. The shared core of DPS, PSLD and P2L."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        eps = eps_fn(z)
        z0 = tweedie(z, eps, a)
        grad, = torch.autograd.grad(loss_fn(z0, prior.decode(z0)).sum(), z)
    return eps.detach(), z0.detach(), grad


def dps_gradient(prior, op, y, z, t, a, eps_fn):
    """ε̂, ẑ0 and ∇_z Σ_b ‖y_b − A D(ẑ0(z_b))‖₂ (latent DPS, Chung et al. 2023): the gradient flows through the
    noise prediction and the VAE decoder. The norm is not squared, as in the DPS and official TReg code."""
    return tweedie_gradient(prior, z, a, eps_fn, lambda z0, x0: residual_norm(op, y, x0))


@dataclasses.dataclass
class DDIMConfig:
    """Text-to-image DDIM (Song et al., ICLR 2021) with classifier-free guidance; ignores y. Baseline."""
    steps: int = bounded(200, 1, 1000)
    cfg_guidance: float = bounded(4.0, 0, 100)
    official_shift: bool = True   # TReg's ᾱ_{t-1} indexing (see treg.diffusion.schedule)


@torch.no_grad()
def ddim(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    z, c, uc = _start(prior, op, y, c, uc, generator)
    for i, (t, a, a_prev) in enumerate(schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)):
        eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
        z0 = tweedie(z, eps, a)
        z = ddim_step(z0, eps, a_prev)
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z0": z0})
    return prior.decode(z0)


@dataclasses.dataclass
class TRegConfig:
    """Regularization by Texts (Kim, Park, Chung, Ye, ICLR 2025). Defaults are the official code's."""
    steps: int = bounded(200, 1, 1000)        # DDIM steps ("leading" spacing: t = 996, 991, …, 1)
    cfg_guidance: float = bounded(4.0, 0, 100)  # w; official CLI default (its README commands pass 5.0); 0 = no text
    official_shift: bool = True   # the official ᾱ_{t-1} indexing (see treg.diffusion.schedule)
    dc_every: int = bounded(3, 1, 1000)       # data consistency on every 3rd step ...
    dc_until: float = bounded(0.85, 0, 1)     # ... while step < 0.85·steps (official: step < 170 of 200)
    cg_iters: int = bounded(5, 0, 10000)      # CG iterations of the pixel-space proximal solve
    cg_lamb: float = bounded(1e-4, 0, 1e6, low_open=True)  # λ of the prox, relative to A's scale (SR rows sum to 1)
    cg_tol: float = bounded(1e-4, 0, 1e3)     # CG stops early once ‖r‖ < tol
    # Not in the official code (calibration options, measured in docs/benchmarks.md): with cg_lamb_noise set, the
    # prox weight follows the noise level, λ_t = cg_lamb_noise·σ_y²·ᾱ_t/(1−ᾱ_t) (the MAP weight σ_y²/r_t² for
    # ẑ0's error r_t² = (1−ᾱ_t)/ᾱ_t, DiffPIR's ρ_t), instead of the fixed cg_lamb; eta > 0 makes the steps without
    # data consistency stochastic DDIM (Song et al. 2021, eq. 16).
    cg_lamb_noise: float | None = bounded(None, 0, 1e6, low_open=True)
    sigma_y: float | None = bounded(None, 0, 10)  # y's noise std for cg_lamb_noise; None = the task's noise_scale
    eta: float = bounded(0.0, 0, 1)
    use_AN: bool = False                      # adaptive negation (the official README always passes --use_AN)
    null_lr: float = bounded(8e-4, 0, 1)      # Adam learning rate on the null-text embedding
    null_iters: int = bounded(10, 0, 10000)   # Adam steps per adaptive-negation call
    use_DPS: bool = False                     # latent DPS step (w = 0) on the steps without data consistency
    dps_lamb: float | None = bounded(None, 0, 1e3)  # DPS step size; None = √ᾱ' at each step
    init: str = one_of("noise", ("noise", "inversion"))  # EXPERIMENTAL "inversion": treg.solvers.inversion.warm_start
    init_t: int = bounded(500, 1, 999)        # with init = inversion: start at the first step with t ≤ init_t ...
    init_invert_t: int = bounded(100, 1, 999)  # ... from A⁺y inverted to here, re-noised (= init_t: deterministic)


def adaptive_negation(prior, x, uc, lr, iters):
    """TReg's adaptive negation: `iters` steps of a fresh Adam on the null embedding uc (B,L,D), minimising
    mean_k ⟨f̂, uc_k⟩ with f̂ the unit CLIP image embedding of x. The loss is linear in uc, so each call moves
    every token by exactly −iters·lr·sign(f̂) (up to Adam's eps): the null text is pushed away from the image."""
    f = prior.image_features(x)
    f = f / f.norm(dim=-1, keepdim=True)
    uc = uc.detach().clone().requires_grad_()
    opt = torch.optim.Adam([uc], lr=lr)
    with torch.enable_grad():
        for _ in range(iters):
            loss = (uc @ f[:, :, None]).mean(dim=(1, 2)).sum()  # per-image means, so images stay independent
            opt.zero_grad()
            loss.backward()
            opt.step()
    return uc.detach()


@torch.no_grad()
def treg(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    if cfg.cg_lamb_noise is not None and cfg.sigma_y is None:
        raise ValueError("treg: cg_lamb_noise needs sigma_y (solve.py sets it to the task's noise_scale)")
    z, c, uc = _start(prior, op, y, c, uc, generator)
    z, first = warm_start(prior, op, y, cfg, c=c, uc=uc, generator=generator) if cfg.init == "inversion" else (z, 0)
    dc_until = round(cfg.dc_until * cfg.steps)
    for i, (t, a, a_prev) in enumerate(schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)):
        if i < first:
            continue
        z_t, info = z, {}
        if i % cfg.dc_every == 0 and i < dc_until:
            # 1. Tweedie estimate under classifier-free guidance
            eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
            z0 = tweedie(z, eps, a)
            # 2. data consistency: pixel-space prox argmin ‖y − A x‖² + λ‖x − D(ẑ0)‖² by CG, then re-encode
            lamb = cfg.cg_lamb if cfg.cg_lamb_noise is None else cfg.cg_lamb_noise * cfg.sigma_y ** 2 * a / (1 - a)
            x0y = prox(op, prior.decode(z0), y, lamb, cfg.cg_iters, cfg.cg_tol)
            z0y = prior.encode(x0y, generator)
            # 3. adaptive negation: move the null text away from the data-consistent image
            if cfg.use_AN:
                uc = adaptive_negation(prior, x0y, uc, cfg.null_lr, cfg.null_iters)
            # 4. stochastic re-noising around the blend ᾱ'·ẑ0ʸ + (1−ᾱ')·ẑ0 (official coefficients; the noise
            #    mix (1−ᾱ')·ε̂ + √(ᾱ'(1−ᾱ'))·n has unit variance)
            z0_blend = a_prev * z0y + (1 - a_prev) * z0
            noise = randn(z.shape, generator, z.device)
            z = a_prev ** 0.5 * z0_blend + (1 - a_prev) * eps + (a_prev * (1 - a_prev)) ** 0.5 * noise
            info = {"x0y": x0y, "noise": noise}
        elif cfg.use_DPS:
            # latent DPS step with the (adapted) null text only, w = 0, as in the official code
            eps, z0, grad = dps_gradient(prior, op, y, z, t, a, lambda z_: prior.eps(z_, t, uc))
            step = cfg.dps_lamb if cfg.dps_lamb is not None else a_prev ** 0.5
            z = ddim_step(z0, eps, a_prev) - step * grad
        else:
            eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
            z0 = tweedie(z, eps, a)
            if cfg.eta > 0:  # DDIM's σ_t(η) = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ')
                sigma = cfg.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
                info = {"noise": randn(z.shape, generator, z.device)}
                z = ddim_step(z0, eps, a_prev, sigma, info["noise"])
            else:
                z = ddim_step(z0, eps, a_prev)
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z": z_t, "z0": z0, "eps": eps, **info})
    return prior.decode(z0)


@dataclasses.dataclass
class DPSConfig:
    """Latent DPS: DPS (Chung et al., ICLR 2023) in SD's latent space, the "Latent-DPS" baseline of PSLD and TReg."""
    steps: int = bounded(200, 1, 1000)          # DDIM steps, as every solver of the official TReg code
    cfg_guidance: float = bounded(0.0, 0, 100)  # w; 0 = null prompt only (TReg's DPS branch), 1 = conditional only
    official_shift: bool = True                 # TReg's ᾱ_{t-1} indexing (see treg.diffusion.schedule)
    step_size: float = bounded(1.0, 0, 1e3)     # ζ in z ← z' − ζ·∇‖y − A D(ẑ0)‖ (unit step: PSLD's ω = 1, γ = 0)
    init: str = one_of("noise", ("noise", "inversion"))  # EXPERIMENTAL "inversion": treg.solvers.inversion.warm_start
    init_t: int = bounded(500, 1, 999)          # with init = inversion: start at the first step with t ≤ init_t ...
    init_invert_t: int = bounded(100, 1, 999)   # ... from A⁺y inverted to here, re-noised (= init_t: deterministic)


@torch.no_grad()
def dps(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    z, c, uc = _start(prior, op, y, c, uc, generator)
    z, first = warm_start(prior, op, y, cfg, c=c, uc=uc, generator=generator) if cfg.init == "inversion" else (z, 0)
    for i, (t, a, a_prev) in enumerate(schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)):
        if i < first:
            continue
        # 1. ε̂ (CFG) and the Tweedie estimate ẑ0, with ∇_z ‖y − A D(ẑ0)‖ through the UNet and the decoder
        eps_fn = lambda z_: guided_eps(prior, z_, t, uc, c, cfg.cfg_guidance)
        eps, z0, grad = dps_gradient(prior, op, y, z, t, a, eps_fn)
        # 2. DDIM step (η = 0), then the measurement-guidance step
        z = ddim_step(z0, eps, a_prev) - cfg.step_size * grad
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z0": z0})
    return prior.decode(z0)


@dataclasses.dataclass
class PSLDConfig:
    """PSLD (Rout et al., NeurIPS 2023): latent DPS plus a "gluing" term that keeps ẑ0 a fixed point of
    encode∘(project onto {A x = y})∘decode. With γ = 0 it is `dps` with step_size = ω."""
    steps: int = bounded(200, 1, 1000)          # DDIM steps (official TReg psld.yaml; the PSLD repo: 1000)
    cfg_guidance: float = bounded(4.0, 0, 100)  # w; the official TReg CLI default, passed to PSLD too ("PSLD+CFG")
    official_shift: bool = True                 # TReg's ᾱ_{t-1} indexing (see treg.diffusion.schedule)
    omega: float = bounded(1.0, 0, 1e3)         # ω, weight of ‖y − A D(ẑ0)‖ (official TReg file and PSLD repo)
    gamma: float = bounded(0.5, 0, 1e3)         # γ, weight of the gluing norm (official TReg file; PSLD CLI: 0.1)


@torch.no_grad()
def psld(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    z, c, uc = _start(prior, op, y, c, uc, generator)

    def psld_loss(z0, x0):
        # ω‖y − A D(ẑ0)‖ + γ‖ẑ0 − E(A⁺y + (I − A⁺A) D(ẑ0))‖ per image, with A⁺y + (I − A⁺A)x = x + A⁺(y − A x).
        # The paper's projection uses A⁺ (Aᵀ only where A Aᵀ = I, e.g. inpainting); E is the prior's encoder.
        glued = prior.encode(x0 + op.pinv(y - op.A(x0)), generator)
        return cfg.omega * residual_norm(op, y, x0) + cfg.gamma * (z0 - glued).flatten(1).norm(dim=1)

    for i, (t, a, a_prev) in enumerate(schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)):
        # 1. ε̂ (CFG), ẑ0 and the gradient of the PSLD loss through the UNet, the decoder and the encoder
        eps_fn = lambda z_: guided_eps(prior, z_, t, uc, c, cfg.cfg_guidance)
        eps, z0, grad = tweedie_gradient(prior, z, a, eps_fn, psld_loss)
        # 2. DDIM step (η = 0) minus the gradient, unit step size as in the PSLD and official TReg code
        z_t, z = z, ddim_step(z0, eps, a_prev) - grad
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z": z_t, "z0": z0, "eps": eps})
    return prior.decode(z0)


PROMPT_TUNING = ("every_step", "first_step")


@dataclasses.dataclass
class P2LConfig:
    """P2L (Chung, Ye, Milanfar, Delbracio 2024), with the settings of the TReg code's re-implementation: the prompt
    embedding c is tuned by Adam to fit y, and a latent DPS step uses the tuned prompt.

    prompt_tuning "every_step" (default) tunes c at every timestep, as the P2L paper describes. "first_step" runs it
    as the official TReg code does: its loop is written to tune at every step, but after the first step
    `c = c.detach()` rebinds the name, so later Adam steps update a tensor nothing reads and c stays as tuned at
    t = 996. With "first_step" the later tuning passes are skipped rather than computed and discarded (so NFE and
    time are lower than the official code spends); configs/solver/p2l-official.yaml adds its w = 4."""
    steps: int = bounded(200, 1, 1000)          # DDIM steps (official TReg p2l.yaml)
    cfg_guidance: float = bounded(1.0, 0, 100)  # w of the DPS step; 1 = tuned prompt only (P2LSolver.sample)
    official_shift: bool = True                 # TReg's ᾱ_{t-1} indexing (see treg.diffusion.schedule)
    prompt_lr: float = bounded(1e-4, 0, 1)      # Adam learning rate on c (official TReg code)
    prompt_iters: int = bounded(1, 0, 1000)     # Adam steps on c per tuned timestep (official TReg code)
    step_size: float = bounded(1.0, 0, 1e3)     # DPS step ζ (official TReg code: unit step)
    prompt_tuning: str = one_of("every_step", PROMPT_TUNING)  # when c is tuned (see above)


@torch.no_grad()
def p2l(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    z, c, uc = _start(prior, op, y, c, uc, generator)
    c = c.clone().requires_grad_()  # one prompt per image, trained over the whole solve with one Adam state
    opt = torch.optim.Adam([c], lr=cfg.prompt_lr)
    for i, (t, a, a_prev) in enumerate(schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)):
        # 1. prompt tuning: Adam on c for Σ_b ‖y_b − A D(ẑ0(z_t; c_b))‖², conditional prediction (w = 1), z_t fixed
        #    (the official code takes the MSE, a mean: the same Adam steps up to Adam's ε, but batch-dependent)
        with torch.enable_grad():
            for _ in range(cfg.prompt_iters if cfg.prompt_tuning == "every_step" or i == 0 else 0):
                fit = residual_norm(op, y, prior.decode(tweedie(z, prior.eps(z, t, c), a))).pow(2).sum()
                opt.zero_grad()
                fit.backward()
                opt.step()
        tuned = c.detach().clone()
        # 2. latent DPS step with the tuned prompt
        eps_fn = lambda z_: guided_eps(prior, z_, t, uc, tuned, cfg.cfg_guidance)
        eps, z0, grad = dps_gradient(prior, op, y, z, t, a, eps_fn)
        z_t, z = z, ddim_step(z0, eps, a_prev) - cfg.step_size * grad
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z0": z0, "z": z_t, "c": tuned})
    return prior.decode(z0)


# RED-diff's SNR weightings g(s) of s = √(1−ᾱ)/√ᾱ = 1/√SNR (the official `denoise_term_weight` options)
WEIGHTINGS = {
    "linear": lambda s: s,
    "sqrt": lambda s: s ** 0.5,
    "square": lambda s: s ** 2,
    "log": lambda s: math.log1p(s),
    "trunc_linear": lambda s: min(s, 1.0),
    "power2over3": lambda s: s ** (2 / 3),
    "const": lambda s: 1.0,
}


def snr_weight(a, weighting):
    """RED-diff's w(t) = g(√(1−ᾱ)/√ᾱ); with "linear", λ·w·(ε̂ − ε) = λ·(z − ẑ0(z_t)) (the RED identity)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[weighting](((1 - a) / a) ** 0.5)


@dataclasses.dataclass
class REDDiffConfig:
    """Latent RED-diff with text (Mardani et al., ICLR 2024; latent form as in RLSD, Zilberstein et al., ICLR 2025).

    Adam on the clean latent z, one step per timestep of a descending sweep, on the per-image loss
        ½‖y − A D(z)‖² + λ·w(t)·⟨sg(ε̂(z_t) − ε), z⟩,   z_t = √ᾱ_t z + √(1−ᾱ_t) ε,  ε ~ N(0, I) fresh every step.
    Normalisation: both terms are SUMS over each image's elements (and per-image losses are summed over the batch),
    so λ means the same for every task and size. The official code takes means (data: over the M measured values,
    prior: over the N latent values), which is λ_sum = λ_mean·M/N; the default converts RLSD's λ_mean = 0.1 at
    TReg's headline task, ×16 SR at 512² (M = 3·32², N = 4·64²): 0.1·3072/16384 = 0.01875.
    That conversion holds only at ×16 SR: M/N differs per task (Gaussian deblur at 512², M = 3·512², gives
    λ_sum = 4.8 for the same λ_mean), so at other tasks this λ is a different regularisation strength than RLSD's.
    Timesteps: SD's DDIM grid (treg.diffusion.timesteps: 996, 991, …, 1 for 200 steps, as RLSD's
    `set_timesteps(200)`), with the unshifted ᾱ_t = alphas_cumprod[t] for the noising and the UNet's t.
    Output: D(z) AFTER the last Adam step, the estimate that all `steps` updates produced. The official RED-diff
    returns the estimate from before its last update; the two differ by one Adam step at t = 1, where w(t) ≈ 0.04
    and the step is mostly a data-fit step. `callback` receives each step's updated z as z0.
    """
    steps: int = bounded(200, 1, 1000)          # timesteps swept (RLSD: 200; RED-diff pixel code: 50–1000)
    cfg_guidance: float = bounded(1.0, 0, 100)  # w of ε̂; 1 = conditional prediction only (RLSD: empty prompt)
    lam: float = bounded(0.01875, 0, 1e3)       # λ for summed losses (RLSD's w_t = 0.1 for means, converted above)
    lr: float = bounded(0.2, 0, 10, low_open=True)  # Adam learning rate on z (RLSD lr_z = 0.2)
    weighting: str = one_of("linear", WEIGHTINGS)  # g in w(t) = g(√(1−ᾱ)/√ᾱ) (RED-diff's default: linear)


@torch.no_grad()
def reddiff(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    snr_weight(1.0, cfg.weighting)  # fail on an unknown weighting before any work
    b = y.shape[0]
    c, uc = c.expand(b, -1, -1), uc.expand(b, -1, -1)
    # 0. initialise at the encoded pseudo-inverse, z = E(A⁺y); Adam as in RED-diff (betas 0.9, 0.99)
    z = prior.encode(op.pinv(y), generator).clone().requires_grad_()
    opt = torch.optim.Adam([z], lr=cfg.lr, betas=(0.9, 0.99))
    for i, t in enumerate(timesteps(cfg.steps, len(prior.alphas_cumprod))):
        a = prior.alphas_cumprod[t].item()
        # 1. diffuse the current estimate with fresh noise: z_t = √ᾱ z + √(1−ᾱ) ε
        noise = randn(z.shape, generator, z.device).to(z)
        z_t = a ** 0.5 * z + (1 - a) ** 0.5 * noise
        # 2. text-conditioned noise prediction, no gradient (no backprop through the UNet)
        eps = guided_eps(prior, z_t, t, uc, c, cfg.cfg_guidance)
        # 3. one Adam step on ½‖y − A D(z)‖² + λ·w(t)·⟨ε̂ − ε, z⟩; the gradient flows through A and the decoder
        with torch.enable_grad():
            fit = 0.5 * residual_norm(op, y, prior.decode(z)) ** 2
            reg = ((eps - noise) * z).flatten(1).sum(1)
            loss = (fit + cfg.lam * snr_weight(a, cfg.weighting) * reg).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z0": z.detach().clone()})
    return prior.decode(z.detach())
