"""The peers' solvers, on the same latent priors and with the same signature as treg.solvers.latent:

    fn(prior, op, y, cfg, *, c, uc, generator=None, callback=None) -> x    # (B,3,H,W) in [-1,1]

    DiffPIR  Zhu, Zhang, Liang, Cao, Wen, Timofte, Van Gool, "Denoising Diffusion Models for Plug-and-Play Image
             Restoration", CVPR workshops (NTIRE) 2023, arXiv 2305.08995
    DAPS     Zhang, Chu, Berner, Meng, Anandkumar, Song, "Improving Diffusion Inverse Problem Solving with Decoupled
             Noise Annealing", CVPR 2025, arXiv 2407.01521 (Latent DAPS on latent priors)
    ReSample Song, Kwon, Zhang, Hu, Qu, Shen, "Solving Inverse Problems with Latent Diffusion Models via Hard Data
             Consistency", ICLR 2024, arXiv 2307.08123

Units. σ_y (the task's noise_scale) is a std on [-1,1] images. The DiffPIR paper and its official code state the
noise on [0,1] images (σ_n = 12.75/255 = 0.05 for the noisy tasks, added as 2σ_n on [-1,1]), and deepinv does the
same, so σ_n = σ_y/2 here: a λ means what it means in the paper. DAPS's likelihood std τ is σ_y itself (the
official code adds the measurement noise with the same std on [-1,1] images).
"""
import dataclasses
import math

import torch

from treg.config import ConfigError, bounded
from treg.diffusion import ddim_step, guided_eps, randn, schedule, tweedie
from treg.linalg import prox
from treg.solvers.latent import _start, dps_gradient, residual_norm

SIGMA_N_FLOOR = 0.001  # official code: sigma = max(0.001, noise_level_img) (main_ddpir_sisr.py), [0,1] units
TAU_FLOOR = 0.01       # DAPS: the official τ, fixed at 0.01 in every task config (configs/task/*.yaml, tau: 0.01)


def diffpir_rho(lam, sigma_y, a):
    """ρ_t = λσ_n²/σ̄_t² with σ_n = max(σ_y/2, 0.001) and σ̄_t² = (1 − ᾱ_t)/ᾱ_t (the paper's Algorithm 1 and its
    official code; see `diffpir`)."""
    sigma_n = max(sigma_y / 2, SIGMA_N_FLOOR)
    return lam * sigma_n ** 2 * a / (1 - a)


@dataclasses.dataclass
class DiffPIRConfig:
    """DiffPIR (Zhu et al., CVPRW 2023): Tweedie estimate, a proximal data step, DDIM-style re-noising with a share ζ
    of fresh noise. λ and ζ are deepinv.sampling.DiffPIR's defaults, λ read in the paper's ρ_t (see `diffpir`)."""
    steps: int = bounded(100, 1, 1000)          # the paper's 100 NFE (official iter_num 100; deepinv max_iter 100)
    cfg_guidance: float = bounded(4.0, 0, 100)  # w of ε̂ (project default, as TReg's CLI); 0 = null text only
    official_shift: bool = True                 # TReg's ᾱ_{t-1} indexing (see treg.diffusion.schedule)
    lam: float = bounded(7.0, 0, 1e6, low_open=True)  # λ in ρ_t = λσ_n²/σ̄_t² (deepinv lambda_=7.0)
    zeta: float = bounded(0.1, 0, 1)            # ζ, share of fresh noise (deepinv zeta=0.1; official configs 0.1)
    sigma_y: float | None = bounded(None, 0, 10)  # y's noise std; None = the task's noise_scale
    cg_iters: int = bounded(50, 1, 10000)       # CG iterations of the data step (deepinv LinearPhysics max_iter 50)
    cg_tol: float = bounded(1e-6, 0, 1e3)       # CG stops once ‖r‖ < tol (chosen here: the step solved, not sketched)


@torch.no_grad()
def diffpir(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    """DiffPIR, Algorithm 1 of arXiv 2305.08995 (as deepinv.sampling.DiffPIR writes it, diffusion.py:237-244),
    one step t → t' of our `schedule` (t, ᾱ_t, ᾱ_t'):

        (1) ẑ0 = (z_t − √(1−ᾱ_t) ε_θ(z_t))/√ᾱ_t, ε_θ classifier-free guided (w = cfg_guidance)
        (2) x̃0 = argmin_x ‖y − A x‖² + ρ_t‖x − D(ẑ0)‖²,  ρ_t = λσ_n²/σ̄_t²,  σ̄_t² = (1−ᾱ_t)/ᾱ_t;  z̃0 = E(x̃0)
        (3) ε̂ = (z_t − √ᾱ_t z̃0)/√(1−ᾱ_t)
        (4) z_t' = √ᾱ_t' z̃0 + √(1−ᾱ_t') (√(1−ζ) ε̂ + √ζ ε),  ε ~ N(0, I)

    (2) is the data sub-problem of the paper's half-quadratic splitting of ‖y − Hx‖²/(2σ_n²) + λP(x): argmin
    ‖y − Hx‖² + μσ_n²‖x − z‖² with μ = λ/σ̄_t² (paper §3; official README), i.e. ρ_t against the unhalved
    ‖y − Ax‖², as the official code solves it ((AᵀA + ρ_t I)x = Aᵀy + ρ_t x0, USRNet's closed form). deepinv
    calls L2().prox(x0, gamma=1/(2ρ_t)) = argmin ½γ‖Ax − y‖² + ½‖x − x0‖² (diffusion.py:484-486): weight 2ρ_t,
    so its λ = 7 acts as the paper's λ = 14. σ_n = σ_y/2 (module docstring), floored at 0.001 as the official
    code does (σ_y = 0 is then a near-projection). Returns D(z̃0) of the last step, the paper's x_0: its last step
    lands on the data (ᾱ_0 = 1), while ours ends at alphas_cumprod[0] (SD: 0.99915, whose re-noising would leave
    √(1−ᾱ_0) = 0.029 of latent noise in the output).

    Latent priors: (1), (3), (4) on latents, (2) in pixels with D = prior.decode, E = prior.encode (TReg's loop
    without adaptive negation and without its blend); a pixel prior has D = E = I, the paper's pixel form.
    """
    if cfg.sigma_y is None:
        raise ConfigError("diffpir: sigma_y is not set (solve.py sets it to the task's noise_scale)")
    z, c, uc = _start(prior, op, y, c, uc, generator)
    z = z.to(y.dtype)
    for i, (t, a, a_prev) in enumerate(schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)):
        # (1) Tweedie estimate under classifier-free guidance
        eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
        z0 = tweedie(z, eps, a)
        # (2) data step: pixel-space prox with ρ_t, then re-encode
        x0y = prox(op, prior.decode(z0), y, diffpir_rho(cfg.lam, cfg.sigma_y, a), cfg.cg_iters, cfg.cg_tol)
        z0y = prior.encode(x0y, generator)
        # (3) the noise that takes the data-consistent estimate back to z_t
        eps_hat = (z - a ** 0.5 * z0y) / (1 - a) ** 0.5
        # (4) re-noise to t': a share ζ of fresh noise
        noise = randn(z.shape, generator, z.device).to(z)
        z_t, z = z, a_prev ** 0.5 * z0y + (1 - a_prev) ** 0.5 * (
            (1 - cfg.zeta) ** 0.5 * eps_hat + cfg.zeta ** 0.5 * noise)
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z": z_t, "z0": z0, "eps": eps, "x0y": x0y})
    return prior.decode(z0y)


def daps_sigmas(sigma_max, sigma_min, steps, rho=7):
    """EDM's "poly-ρ" ramp σ(r) = (σ_max^(1/ρ) + r·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ at r = k/steps, k = 0..steps: the
    official EDMScheduler grid (DAPS cores/scheduler.py:278, 312-315), both ends included."""
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(top + k / steps * (bottom - top)) ** rho for k in range(steps + 1)]


def nearest_level(alphas_cumprod, sigma):
    """(t, ᾱ_t) of the timestep whose VE noise level σ_t = √((1 − ᾱ_t)/ᾱ_t) is nearest to σ in log σ: a DAPS noise
    level on our discrete VP schedule (z = √ᾱ·x for a VE state x). σ outside [σ_0, σ_{T−1}] snaps to that end."""
    ac = alphas_cumprod.double().cpu()
    t = int((((1 - ac) / ac).log() / 2 - math.log(sigma)).abs().argmin())  # |log σ_t − log σ|
    return t, ac[t].item()


@dataclasses.dataclass
class DAPSConfig:
    """Latent DAPS (Zhang et al., CVPR 2025) with Langevin dynamics, the paper's Algorithm 1. Defaults: the official
    Stable Diffusion setting (configs/sampler/sd_edm_daps.yaml; ×4 SR's `sd` group of configs/task/down_sampling.yaml,
    the closest official task to ours), which runs damped HMC (momentum 0.45) where this runs Langevin."""
    steps: int = bounded(50, 1, 1000)            # annealing levels N (official num_steps 50); NFE = N·ode_steps·(CFG 2)
    cfg_guidance: float = bounded(7.5, 0, 100)   # w of ε̂ (official SD guidance_scale 7.5); 0 = null text only
    sigma_max: float = bounded(10.0, 0, 1e4, low_open=True)  # first annealing level, VE σ (official sigma_max 10)
    sigma_min: float = bounded(0.1, 0, 1e4, low_open=True)   # end of the poly-7 ramp, never a level itself (0.1)
    ode_steps: int = bounded(2, 1, 100)          # Euler steps of the PF-ODE per level (official num_steps 2)
    ode_sigma_min: float = bounded(0.001, 0, 1)  # where the PF-ODE stops, x̂0 = x(σ) (official sigma_min 0.001)
    langevin_steps: int = bounded(30, 0, 10000)  # K Langevin steps per level (official sd num_steps 30)
    lr: float = bounded(1e-4, 0, 1, low_open=True)  # η, Langevin step size at the first level (official sd lr 1e-4)
    lr_min_ratio: float = bounded(1.0, 0, 1)     # η decays linearly towards lr·lr_min_ratio (official sd: 1, none)
    sigma_y: float | None = bounded(None, 0, 10)  # y's noise std; τ = max(σ_y, 0.01); None = the task's noise_scale


@torch.no_grad()
def daps(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    """Latent DAPS, Algorithm 1 of arXiv 2407.01521 as the official code runs it (sampler.py:168-186,
    cores/mcmc.py). The state x is a VE latent (x_i = x0 + σ_i·n; the model sees z = √ᾱ·x, ᾱ = 1/(1 + σ²)).
    Levels σ_0 > … > σ_{N−1}: the poly-7 ramp from sigma_max to sigma_min at r = i/N, i < N (the official grid has
    N + 1 points and replaces the last by 0: scheduler.py:39-44), each snapped to our nearest timestep
    (`nearest_level`); this does not use `schedule`'s DDIM grid. x_0 ~ N(0, σ_0² I). Per level i:

        (1) x̂0 = the PF-ODE dx/dσ = ε̂(√ᾱ x, t) from σ_i down to ode_sigma_min, by ode_steps Euler steps on the
            poly-7 ramp between them (intermediate σ snapped to timesteps); an Euler step in VE is exactly a
            deterministic DDIM step in VP. ε̂ is classifier-free guided (w = cfg_guidance).
        (2) K Langevin steps from x0 = x̂0 on log N(x0; x̂0, r_i² I) + log N(y; A D(x0), τ² I), r_i = σ_i
            (mcmc.py:46-50 with the "gaussian" prior score of 71-72: (x_t − x0)/σ² + (x̂0 − x_t)/σ²):
            x0 ← x0 + η_i·[(x̂0 − x0)/r_i² − ∇‖y − A D(x0)‖²/(2τ²)] + √(2η_i)·ε,
            η_i = lr·(1 + (i/(N + 1))·(lr_min_ratio − 1)) (mcmc.py:87-88, 174-180 with sampler.py:178); the gradient
            flows through the decoder D = prior.decode (a pixel prior's D is I).
        (3) x_{i+1} = x0 + σ_{i+1}·ε with fresh ε; after the last level, none (σ_N = 0).

    Returns D(x0) of the last level. τ = max(sigma_y, 0.01): y's noise, floored at the official fixed τ = 0.01
    (its task configs; their SD tasks' noise is 0.01 too), so that a noiseless task keeps the Langevin step stable.
    The likelihood is ‖·‖²/(2τ²) as in the paper and the first official code (legacy sampler.py:261); the current
    code drops the ½ (mcmc.py:46-47 with the un-halved Operator.loss: τ/√2 in effect) and clamps the latent
    gradient to [−1, 1] (forward_operator/__init__.py:401-402); neither is kept. The callback gets z (the level's
    model input), z0 = x̂0 and z0y = the Langevin sample.
    """
    if cfg.sigma_y is None:
        raise ConfigError("daps: sigma_y is not set (solve.py sets it to the task's noise_scale)")
    if cfg.sigma_min >= cfg.sigma_max:
        raise ConfigError(f"daps: sigma_min {cfg.sigma_min:g} must be below sigma_max {cfg.sigma_max:g}")
    tau, ac = max(cfg.sigma_y, TAU_FLOOR), prior.alphas_cumprod
    levels = [nearest_level(ac, s) for s in daps_sigmas(cfg.sigma_max, cfg.sigma_min, cfg.steps)[:-1]]
    sigma_of = lambda a: ((1 - a) / a) ** 0.5
    n, c, uc = _start(prior, op, y, c, uc, generator)
    x = sigma_of(levels[0][1]) * n.to(y.dtype)
    for i, (t, a) in enumerate(levels):
        sigma = sigma_of(a)
        # (1) x̂0: Euler steps of the PF-ODE from σ_i to ode_sigma_min, each a DDIM step from ᾱ_k to ᾱ_{k+1}
        ode = [(t, a)] + [nearest_level(ac, s) for s in daps_sigmas(sigma, cfg.ode_sigma_min, cfg.ode_steps)[1:-1]]
        ends = [a_next for _, a_next in ode[1:]] + [1 / (1 + cfg.ode_sigma_min ** 2)]
        x0_hat = x
        for (t_k, a_k), a_next in zip(ode, ends):
            z_k = a_k ** 0.5 * x0_hat
            eps = guided_eps(prior, z_k, t_k, uc, c, cfg.cfg_guidance)
            x0_hat = ddim_step(tweedie(z_k, eps, a_k), eps, a_next) / a_next ** 0.5
        # (2) Langevin dynamics on x0 with target N(x0; x̂0, σ_i² I)·N(y; A D(x0), τ² I)
        lr = cfg.lr * (1 + i / (cfg.steps + 1) * (cfg.lr_min_ratio - 1))
        x0 = x0_hat
        for _ in range(cfg.langevin_steps):
            with torch.enable_grad():
                v = x0.detach().requires_grad_()
                fit = (y - op.A(prior.decode(v))).pow(2).sum() / (2 * tau ** 2)  # per-image sums
                grad, = torch.autograd.grad(fit, v)
            score = (x0_hat - x0) / sigma ** 2 - grad
            x0 = x0 + lr * score + (2 * lr) ** 0.5 * randn(x.shape, generator, x.device).to(x)
        # (3) re-noise at the next level with fresh noise
        x_i = x
        if i + 1 < len(levels):
            x = x0 + sigma_of(levels[i + 1][1]) * randn(x.shape, generator, x.device).to(x)
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z": a ** 0.5 * x_i, "z0": x0_hat, "z0y": x0})
    return prior.decode(x0)


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which the official ReSample code keeps


def adamw_fit(loss_fn, v, lr, iters, tol, patience, weight_decay):
    """ReSample's data-consistency optimiser on v (B, ...): at most `iters` steps of torch.optim.AdamW's update
    (β = (0.9, 0.999), ε = 1e-8, decoupled weight decay) on the per-image losses loss_fn(v) (B,), with the official
    stopping rules applied per image (resample/ldm/models/diffusion/ddim.py:358-368, 406-428): an image stops after
    the step at which its loss, evaluated before that step, is < tol², or, with patience p > 0, exceeds its loss p
    steps earlier. Stopped images are frozen, so an image's result does not depend on its batch."""
    (b1, b2), v = ADAM_BETAS, v.detach()
    m, s = torch.zeros_like(v), torch.zeros_like(v)
    active, seen = torch.ones(len(v), dtype=torch.bool, device=v.device), []
    for k in range(1, iters + 1):
        with torch.enable_grad():
            leaf = v.requires_grad_()
            loss = loss_fn(leaf)
            grad, = torch.autograd.grad(loss.sum(), leaf)
        v, loss, on = v.detach(), loss.detach(), active.view(-1, *[1] * (v.dim() - 1))
        m = torch.where(on, b1 * m + (1 - b1) * grad, m)
        s = torch.where(on, b2 * s + (1 - b2) * grad ** 2, s)
        step = lr / (1 - b1 ** k) * m / (s.sqrt() / (1 - b2 ** k) ** 0.5 + ADAM_EPS)
        v = torch.where(on, v * (1 - lr * weight_decay) - step, v)
        seen.append(loss)
        stop = loss < tol ** 2
        if patience and k > patience:
            stop |= seen[k - 1 - patience] < loss
        active &= ~stop
        if not active.any():
            break
    return v


@dataclasses.dataclass
class ReSampleConfig:
    """ReSample (Song et al., ICLR 2024): latent DPS steps; on every 10th step of the last two thirds, hard data
    consistency argmin ‖y − A(D(z))‖² by AdamW (in pixels and re-encoded on the middle third, in latents on the last)
    and stochastic resampling. Defaults are the official code's (github.com/soominkwon/resample, see `resample`)."""
    steps: int = bounded(500, 1, 1000)          # DDIM steps (sample_condition.py:33, --ddim_steps 500)
    cfg_guidance: float = bounded(4.0, 0, 100)  # w of ε̂ (project default, as DiffPIR); the official LDM has no text
    official_shift: bool = False                # ReSample's DDIM uses ᾱ_t at the UNet's t (no TReg ᾱ_{t-1} shift)
    dps_scale: float = bounded(0.5, 0, 1e3)     # z' −= dps_scale·ᾱ_t·∇‖y − A D(ẑ0)‖ on every step (ddim.py:255-261)
    gamma: float = bounded(40.0, 0, 1e6, low_open=True)  # γ in σ_t² = γ·(1−ᾱ')/(1−ᾱ)·(1 − ᾱ/ᾱ') (ddim.py:289, 318)
    dc_every: int = bounded(10, 1, 1000)        # hard data consistency where index % 10 == 0 (ddim.py:273) ...
    splits: int = bounded(3, 1, 1000)           # ... and 0 < index ≤ steps − steps//3; pixels while index ≥ steps//3,
                                                # latents below (ddim.py:264-268, 294, 310)
    travel_steps: int = bounded(5, 0, 1000)     # DDIM steps looked ahead for the optimiser's start (ddim.py:206, 274)
    pixel_lr: float = bounded(1e-2, 0, 10, low_open=True)  # AdamW lr of the pixel-space fit (ddim.py:353)
    pixel_iters: int = bounded(2000, 0, 100000)            # its step limit (ddim.py:337, max_iters=2000)
    latent_lr: float = bounded(5e-3, 0, 10, low_open=True)  # AdamW lr of the latent-space fit (ddim.py:393-394)
    latent_iters: int = bounded(500, 0, 100000)            # its step limit (ddim.py:373, max_iters=500)
    tol: float = bounded(1e-3, 0, 1e3)          # both fits stop once the MSE < tol² (ddim.py:337, 367, 373, 428)
    patience: int = bounded(200, 0, 100000)     # the latent fit stops once its MSE exceeds that of 200 steps earlier
                                                # (ddim.py:419-426); 0 = never
    weight_decay: float = bounded(0.01, 0, 100)  # torch.optim.AdamW's default, which the official code keeps
    final_fit: bool = True                      # a last latent fit of z_0 before decoding (ddim.py:329-332)


@torch.no_grad()
def resample(prior, op, y, cfg, *, c, uc, generator=None, callback=None):
    """ReSample, Algorithm 1 of arXiv 2307.08123 as its official code runs it (ldm/models/diffusion/ddim.py,
    resample_sampling, :189-334), one step t → t' of our `schedule` (t, ᾱ = ᾱ_t, ᾱ' = ᾱ_t'), index = steps − 1 − i:

        (1) ε̂ = ε_θ(z_t) classifier-free guided (w = cfg_guidance), ẑ0 = (z_t − √(1−ᾱ) ε̂)/√ᾱ
        (2) z' = √ᾱ' ẑ0 + √(1−ᾱ') ε̂ − dps_scale·ᾱ·∇_{z_t}‖y − A D(ẑ0)‖       DDIM proposal, latent DPS step
        on the hard-data-consistency steps (0 < index ≤ steps − ⌊steps/3⌋, index % 10 == 0), else z_t' = z':
        (3) start: ẑ0 of the latent reached by `travel_steps` DDIM steps from z' (the code's "time travel")
        (4) ẑ0(y) ≈ argmin_z ‖y − A(D(z))‖² from the start by AdamW (`adamw_fit`): while index ≥ ⌊steps/3⌋ in
            pixels, x̂ ≈ argmin_x ‖y − A x‖² from D(start), ẑ0(y) = E(x̂); below it in latents through D
        (5) stochastic resampling (the paper's Proposition 2): with σ_t² = γ(1−ᾱ')/(1−ᾱ)·(1 − ᾱ/ᾱ'),
            z_t' ~ N((σ_t² √ᾱ' ẑ0(y) + (1−ᾱ') z') / (σ_t² + 1 − ᾱ'),  σ_t²(1−ᾱ')/(σ_t² + 1 − ᾱ') I)
    and after the last step z_0 gets one more latent fit (final_fit); the output is D(z_0).

    Kept from the official code: the DPS step on every step with ‖·‖ unsquared, the two-stage optimisation, the
    look-ahead start, the MSE (a mean over y's values) and its stopping rules, AdamW's weight decay. Dropped
    knowingly: its "Tweedie" pseudo_x0 = (z − (1−ᾱ) ε̂)/√ᾱ (ddim.py:541, (1−ᾱ) for √(1−ᾱ)), used for the DPS
    gradient and the optimiser's start, is the DDIM estimate ẑ0 here; its look-ahead steps take the outer step's
    ᾱ pair for the first step and tell the UNet the next timestep (ddim.py:275-280), here they follow the schedule;
    its norms and MSEs are over the batch, here per image. σ_t² is γ times DDIM's η = 1 variance.

    Pixel priors (D = E = I): both fits are AdamW least squares on the image, and ReSample is pixel DPS with hard
    data consistency and stochastic resampling.
    """
    z, c, uc = _start(prior, op, y, c, uc, generator)
    z = z.to(y.dtype)
    plan = schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)
    third, m = cfg.steps // cfg.splits, y[0].numel()
    mse = lambda x: residual_norm(op, y, x) ** 2 / m  # per image, the official nn.MSELoss (mean over y)
    latent_fit = lambda z_: adamw_fit(lambda v: mse(prior.decode(v)), z_, cfg.latent_lr, cfg.latent_iters, cfg.tol,
                                      cfg.patience, cfg.weight_decay)
    for i, (t, a, a_prev) in enumerate(plan):
        index = cfg.steps - 1 - i
        # (1) CFG ε̂ and Tweedie ẑ0, with ∇‖y − A D(ẑ0)‖ through the UNet and the decoder for the DPS step
        eps_fn = lambda z_: guided_eps(prior, z_, t, uc, c, cfg.cfg_guidance)
        if cfg.dps_scale > 0:
            eps, z0, grad = dps_gradient(prior, op, y, z, t, a, eps_fn)
        else:
            eps = eps_fn(z)
            z0, grad = tweedie(z, eps, a), torch.zeros_like(z)
        # (2) the DDIM proposal z' at t' with the latent DPS step
        z_prop = ddim_step(z0, eps, a_prev) - cfg.dps_scale * a * grad
        z_t, z, info = z, z_prop, {}
        if 0 < index <= cfg.steps - third and index % cfg.dc_every == 0:
            # (3) the optimiser's start: ẑ0 after `travel_steps` DDIM steps ahead of z'
            start, ahead = z0, z_prop
            for t_, a_, a_next in plan[i + 1:i + 1 + cfg.travel_steps]:
                eps_ = guided_eps(prior, ahead, t_, uc, c, cfg.cfg_guidance)
                start = tweedie(ahead, eps_, a_)
                ahead = ddim_step(start, eps_, a_next)
            # (4) hard data consistency: pixel-space fit and re-encoding, or latent-space fit through D
            if index >= third:
                x0y = adamw_fit(mse, prior.decode(start), cfg.pixel_lr, cfg.pixel_iters, cfg.tol, 0, cfg.weight_decay)
                z0y = prior.encode(x0y, generator)
            else:
                z0y = latent_fit(start)
            # (5) stochastic resampling around ẑ0(y) and z'
            sigma2 = cfg.gamma * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            noise = randn(z.shape, generator, z.device).to(z)
            mean = (sigma2 * a_prev ** 0.5 * z0y + (1 - a_prev) * z_prop) / (sigma2 + 1 - a_prev)
            z = mean + (sigma2 * (1 - a_prev) / (sigma2 + 1 - a_prev)) ** 0.5 * noise
            info = {"z_prop": z_prop, "start": start, "z0y": z0y, "noise": noise, "sigma2": sigma2}
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z": z_t, "z0": z0, "eps": eps, **info})
    return prior.decode(latent_fit(z) if cfg.final_fit else z)
