"""The peers' solvers, on the same latent priors and with the same signature as treg.solvers.latent:

    fn(prior, op, y, cfg, *, c, uc, generator=None, callback=None) -> x    # (B,3,H,W) in [-1,1]

    DiffPIR  Zhu, Zhang, Liang, Cao, Wen, Timofte, Van Gool, "Denoising Diffusion Models for Plug-and-Play Image
             Restoration", CVPR workshops (NTIRE) 2023, arXiv 2305.08995

Units. σ_y (the task's noise_scale) is a std on [-1,1] images. The DiffPIR paper and its official code state the
noise on [0,1] images (σ_n = 12.75/255 = 0.05 for the noisy tasks, added as 2σ_n on [-1,1]), and deepinv does the
same, so σ_n = σ_y/2 here: a λ means what it means in the paper.
"""
import dataclasses

import torch

from treg.config import ConfigError, bounded
from treg.diffusion import guided_eps, randn, schedule, tweedie
from treg.linalg import prox
from treg.solvers.latent import _start

SIGMA_N_FLOOR = 0.001  # official code: sigma = max(0.001, noise_level_img) (main_ddpir_sisr.py), [0,1] units


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
