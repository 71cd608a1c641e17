"""Inverse solvers on a latent prior. One function per method, each with its config dataclass right above it.

Every solver has the signature

    fn(prior, op, y, cfg, *, c, uc, generator=None, callback=None) -> x    # (B,3,H,W) in [-1,1]

with `y` the (B, ...) measurement of `op`, `c`/`uc` the prompt and null-prompt embeddings ((1 or B), L, D),
`generator` one torch.Generator or one per batch element, and `callback(info: dict)` called after every step.
Solvers do no I/O. The loops share the small helpers in treg.diffusion and treg.linalg, not a base class.
"""
import dataclasses

import torch

from treg.diffusion import cfg as guided_eps, ddim_step, randn, schedule, tweedie
from treg.linalg import prox


def _start(prior, op, y, c, uc, generator):
    """Initial noise z_T for the image size of `op`, and the embeddings broadcast to the batch."""
    b, _, h, w = op.At(y).shape
    f = prior.vae_scale_factor
    z = randn((b, prior.latent_channels, h // f, w // f), generator, y.device)
    return z, c.expand(b, -1, -1), uc.expand(b, -1, -1)


def residual_norm(op, y, x):
    """Per-image data residual ‖y − A x‖₂, shape (B,)."""
    return (y - op.A(x)).flatten(1).norm(dim=1)


def dps_gradient(prior, op, y, z, t, a, eps_fn):
    """ε̂, ẑ0 and ∇_z Σ_b ‖y_b − A D(ẑ0(z_b))‖₂ (latent DPS, Chung et al. 2023): the gradient flows through the
    noise prediction and the VAE decoder. The norm is not squared, as in the DPS and official TReg code."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        eps = eps_fn(z)
        z0 = tweedie(z, eps, a)
        loss = residual_norm(op, y, prior.decode(z0)).sum()
        grad, = torch.autograd.grad(loss, z)
    return eps.detach(), z0.detach(), grad


@dataclasses.dataclass
class DDIMConfig:
    """Text-to-image DDIM (Song et al., ICLR 2021) with classifier-free guidance; ignores y. Baseline."""
    steps: int = 200
    cfg_guidance: float = 4.0
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
    steps: int = 200              # DDIM steps ("leading" spacing: t = 996, 991, …, 1)
    cfg_guidance: float = 4.0     # w; official CLI default (its README commands pass 5.0); 0 = without text
    official_shift: bool = True   # the official ᾱ_{t-1} indexing (see treg.diffusion.schedule)
    dc_every: int = 3             # data consistency on every 3rd step ...
    dc_until: float = 0.85        # ... while step < 0.85·steps (official: step < 170 of 200)
    cg_iters: int = 5             # CG iterations of the pixel-space proximal solve
    cg_lamb: float = 1e-4         # λ of the prox, relative to the operator's scale (SR rows sum to 1)
    cg_tol: float = 1e-4          # CG stops early once ‖r‖ < tol
    use_AN: bool = False          # adaptive negation (the official README always passes --use_AN)
    null_lr: float = 8e-4         # Adam learning rate on the null-text embedding
    null_iters: int = 10          # Adam steps per adaptive-negation call
    use_DPS: bool = False         # latent DPS step (w = 0) on the steps without data consistency
    dps_lamb: float | None = None  # DPS step size; None = √ᾱ' at each step


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
    z, c, uc = _start(prior, op, y, c, uc, generator)
    dc_until = round(cfg.dc_until * cfg.steps)
    for i, (t, a, a_prev) in enumerate(schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)):
        if i % cfg.dc_every == 0 and i < dc_until:
            # 1. Tweedie estimate under classifier-free guidance
            eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
            z0 = tweedie(z, eps, a)
            # 2. data consistency: pixel-space prox argmin ‖y − A x‖² + λ‖x − D(ẑ0)‖² by CG, then re-encode
            x0y = prox(op, prior.decode(z0), y, cfg.cg_lamb, cfg.cg_iters, cfg.cg_tol)
            z0y = prior.encode(x0y, generator)
            # 3. adaptive negation: move the null text away from the data-consistent image
            if cfg.use_AN:
                uc = adaptive_negation(prior, x0y, uc, cfg.null_lr, cfg.null_iters)
            # 4. stochastic re-noising around the blend ᾱ'·ẑ0ʸ + (1−ᾱ')·ẑ0 (official coefficients; the noise
            #    mix (1−ᾱ')·ε̂ + √(ᾱ'(1−ᾱ'))·n has unit variance)
            z0_blend = a_prev * z0y + (1 - a_prev) * z0
            noise = randn(z.shape, generator, z.device)
            z = a_prev ** 0.5 * z0_blend + (1 - a_prev) * eps + (a_prev * (1 - a_prev)) ** 0.5 * noise
            if callback:
                callback({"i": i, "steps": cfg.steps, "t": t, "z0": z0, "x0y": x0y})
            continue
        elif cfg.use_DPS:
            # latent DPS step with the (adapted) null text only, w = 0, as in the official code
            eps, z0, grad = dps_gradient(prior, op, y, z, t, a, lambda z_: prior.eps(z_, t, uc))
            step = cfg.dps_lamb if cfg.dps_lamb is not None else a_prev ** 0.5
            z = ddim_step(z0, eps, a_prev) - step * grad
        else:
            eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
            z0 = tweedie(z, eps, a)
            z = ddim_step(z0, eps, a_prev)
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z0": z0})
    return prior.decode(z0)


SOLVERS = {
    "ddim": (ddim, DDIMConfig),
    "treg": (treg, TRegConfig),
}
