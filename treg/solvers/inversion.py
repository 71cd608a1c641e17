"""Diffusion inversion: the noisy latent that deterministic DDIM regenerates into a given clean latent.

Sampler step i goes (t, ᾱ, ᾱ') = schedule(...)[i] from z at level ᾱ to z' = √ᾱ'·ẑ0(z) + √(1−ᾱ')·ε̂(z, t). Inverting
it means solving, for z, the implicit equation (RNRI, Samuel et al. 2024, written for this project's triples)

    z = F(z) := √(ᾱ/ᾱ')·z' + √ᾱ·(φ(ᾱ) − φ(ᾱ'))·ε̂(z, t),      φ(a) = √(1/a − 1),

with ε̂ the classifier-free-guided prediction of the sampler that regenerates (same triples, official_shift, w).
The methods differ only in how they solve it per step, walking the schedule backwards from the clean latent
(treated, as in FPI and RNRI, as the level-ᾱ_0 latent that the last step produces):
    ddim_inversion  F(z'): ε̂ evaluated at the wrong point, 1 ε̂ call per step;
    fixed_point     u ← F(u), K times from u = z' (FPI: Samuel et al., arXiv 2312.12540 v1), K calls per step;
    rnri            regularised scalar Newton steps (RNRI), K calls per step, best candidate kept.
K defaults to each method's official value: 20 for FPI (FPI/main.py:51, `num_iter=20`), 2 for RNRI
(NewtonRaphsonInversion/main.py:55, `inv_hp = [2, 0.1, 0.2]`); iters = 2 for FPI is the equal-cost comparison.
With official_shift the last step is a no-op (ᾱ = ᾱ'), whose inverse is the identity: no ε̂ call.

Each function has the signature fn(prior, z0, cfg, *, c, uc, generator=None, callback=None) -> z: z0 (B,C,h,w)
clean latents, c/uc prompt and null embeddings ((1 or B), L, D), one generator or one per image (used only by the
prompt-aware adjustment), and z the latent at the input of sampler step cfg.start_step (0: fully inverted).
`regenerate` runs the sampler from there. No I/O.
"""
import dataclasses

import torch

from treg.config import ConfigError, bounded, one_of
from treg.diffusion import ddim_step, guided_eps, randn, schedule, tweedie
from treg.metrics import psnr


@dataclasses.dataclass
class InversionConfig:
    """Inversion settings; each default's source is in its comment (official FPI and RNRI code)."""
    method: str = one_of("rnri", ("ddim", "fpi", "rnri"))
    steps: int = bounded(50, 1, 1000)           # DDIM steps of the regenerating sampler (FPI/RNRI on SD: 50)
    cfg_guidance: float = bounded(2.0, 0, 100)  # w of inversion and regeneration (FPI/main.py:39-40: 2 for real images)
    official_shift: bool = True                 # TReg's ᾱ_{t-1} indexing (see treg.diffusion.schedule)
    iters: int | None = bounded(None, 1, 1000)  # K, ε̂ calls per step of fpi/rnri; None: the method's official K
    alpha: float = bounded(0.1, 0, 1e6)         # RNRI's weight of the prior term (NewtonRaphsonInversion/main.py:55)
    rnri_form: str = one_of("euler", ("euler", "vp"))  # RNRI's step as the official code takes it, or in VP (rnri)
    start_step: int = bounded(0, 0, 999)        # invert only sampler steps ≥ start_step (partial inversion)
    prompt_aware: bool = False                  # img2img the clean latent with the prompt first (FPI/main.py:46-47)
    adjust_strength: float = bounded(0.05, 0, 1, low_open=True)  # share of the steps that adjustment runs (FPI: 0.05)


OFFICIAL_ITERS = {"fpi": 20, "rnri": 2}


def iterations(cfg):
    """K of cfg: its `iters`, or the method's official value."""
    return OFFICIAL_ITERS[cfg.method] if cfg.iters is None else cfg.iters


def implicit_map(prior, z_next, t, a, a_prev, c, uc, w):
    """F(z) for one sampler step as a function of z: z = F(z) is the exact inverse of that step."""
    phi = lambda x: (1 / x - 1) ** 0.5
    fixed = (a / a_prev) ** 0.5 * z_next
    return lambda z: fixed + a ** 0.5 * (phi(a) - phi(a_prev)) * guided_eps(prior, z, t, uc, c, w)


def _steps(prior, cfg):
    """The sampler's triples and the steps to invert, last step first."""
    triples = schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)
    if cfg.start_step >= cfg.steps:
        raise ValueError(f"start_step must be below steps ({cfg.steps}), got {cfg.start_step}")
    return [(i, *triples[i]) for i in reversed(range(cfg.start_step, cfg.steps))]


def _embeddings(z0, c, uc):
    return c.expand(len(z0), -1, -1), uc.expand(len(z0), -1, -1)


def prompt_aware_adjustment(prior, z0, cfg, *, c, uc, generator=None):
    """FPI's prompt-aware adjustment: img2img of z0 with the prompt at strength `adjust_strength` (re-noise to the
    level of the last ⌊strength·steps⌋ sampler steps with fresh noise, run those steps), so that the latent to be
    inverted is one that the prompted sampler could have produced."""
    c, uc = _embeddings(z0, c, uc)
    triples = schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)
    first = cfg.steps - max(1, int(cfg.adjust_strength * cfg.steps))
    a = triples[first][1]
    z = a ** 0.5 * z0 + (1 - a) ** 0.5 * randn(z0.shape, generator, z0.device).to(z0)
    for t, a, a_prev in triples[first:]:
        if a != a_prev:  # the official shift's last step is a no-op: no ε̂ call for it
            eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
            z = ddim_step(tweedie(z, eps, a), eps, a_prev)
    return z


def _prepare(prior, z0, cfg, c, uc, generator):
    """Embeddings broadcast to the batch, and z0 after the optional prompt-aware adjustment."""
    if cfg.prompt_aware:
        z0 = prompt_aware_adjustment(prior, z0, cfg, c=c, uc=uc, generator=generator)
    return z0, *_embeddings(z0, c, uc)


def ddim_inversion(prior, z0, cfg, *, c, uc, generator=None, callback=None):
    """z ≈ F(z') per step, the noise prediction of the known later latent standing in for that of the unknown one:
    the first fixed-point iteration."""
    return fixed_point(prior, z0, dataclasses.replace(cfg, iters=1), c=c, uc=uc, generator=generator,
                       callback=callback)


@torch.no_grad()
def fixed_point(prior, z0, cfg, *, c, uc, generator=None, callback=None):
    z, c, uc = _prepare(prior, z0, cfg, c, uc, generator)
    for i, t, a, a_prev in _steps(prior, cfg):
        z_next = z
        if a != a_prev:
            # K fixed-point iterations u ← F(u) from u = z' (the first one is DDIM inversion)
            F = implicit_map(prior, z_next, t, a, a_prev, c, uc, cfg.cfg_guidance)
            for _ in range(iterations(cfg)):
                z = F(z)
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z": z, "z_next": z_next})
    return z


def rnri_loss(f, u, z0, a, alpha):
    """RNRI's per-element objective ℓ = |F(u) − u| + (α/2)·(F(u) − √ᾱ·z0)²/(1 − ᾱ): the residual of the implicit
    equation plus the negative log-density of F(u) under q(z_t | z0), which keeps Newton near the right root."""
    return (f - u).abs() + alpha / 2 * (f - a ** 0.5 * z0) ** 2 / (1 - a)


@torch.no_grad()
def rnri(prior, z0, cfg, *, c, uc, generator=None, callback=None):
    """RNRI. rnri_form "euler" is the official step (NewtonRaphsonInversion/src/sdxl_inversion_pipeline.py:329-352)
    written in this project's VP latents z = √ᾱ·x, x the official Euler (VE) latent x = z0 + φ(ᾱ)·ε: there the
    iterate starts at the known later latent x' (:330), which is u⁰ = √(ᾱ/ᾱ')·z' here; its loss |F − x| −
    α·log N(F; z0, φ(ᾱ)²) (:305-316, :339) is ℓ/√ᾱ with ℓ = rnri_loss at prior weight α·√ᾱ, so its selection (:343)
    and its step x ← x − (L/D)/∂L/∂x (:348; D = 64·64·4 there, one image's latent size, per image here) are
    rnri_loss's with that weight. "vp" takes the step in VP latents instead: u⁰ = z' (so candidate 0 is DDIM
    inversion) and the constant weight α, a prior term up to 1/√ᾱ = 13× stronger at high noise (t = 981 of 50
    steps). Measured against each other in assets/inversion.md."""
    # 1. clean latent, optionally prompt-adjusted; it also anchors the prior term of the loss
    z0, c, uc = _prepare(prior, z0, cfg, c, uc, generator)
    z = z0
    euler = cfg.rnri_form == "euler"
    per_image = lambda x: x.flatten(1).mean(1).view(-1, *[1] * (x.dim() - 1))
    for i, t, a, a_prev in _steps(prior, cfg):
        z_next = z
        if a != a_prev:
            # 2. K regularised Newton iterations on z = F(z), one ε̂ call each
            F = implicit_map(prior, z_next, t, a, a_prev, c, uc, cfg.cfg_guidance)
            weight = cfg.alpha * a ** 0.5 if euler else cfg.alpha
            u = (a / a_prev) ** 0.5 * z_next if euler else z_next
            best, best_loss, first_loss = None, None, None
            for _ in range(iterations(cfg)):
                f = F(u)
                loss = per_image(rnri_loss(f, u, z0, a, weight))  # mean ℓ per image = L/D
                # keep the candidate F(u^k) with the smallest mean ℓ, per image
                if best is None:
                    best, best_loss, first_loss = f, loss, loss
                else:
                    better = loss < best_loss
                    best, best_loss = torch.where(better, f, best), torch.where(better, loss, best_loss)
                # scalar Newton step on L with the UNet Jacobian dropped: ∂L/∂u = −sign(F(u) − u), ‖∇L‖² = D,
                # so u − L·∇L/‖∇L‖² = u + mean(ℓ)·sign(F(u) − u)  (sign(0) = 0: no division by zero)
                u = u + loss * torch.sign(f - u)
            # 3. the step's answer is the kept candidate F(u^k), not the last iterate
            z = best
        if callback:
            losses = {} if a == a_prev else {"loss": best_loss.flatten(), "first_loss": first_loss.flatten()}
            callback({"i": i, "steps": cfg.steps, "t": t, "z": z, "z_next": z_next, **losses})
    return z


METHODS = {"ddim": ddim_inversion, "fpi": fixed_point, "rnri": rnri}


def invert(prior, z0, cfg, *, c, uc, generator=None, callback=None):
    """The inversion of cfg.method."""
    return METHODS[cfg.method](prior, z0, cfg, c=c, uc=uc, generator=generator, callback=callback)


@torch.no_grad()
def regenerate(prior, z, cfg, *, c, uc, callback=None):
    """Deterministic DDIM (η = 0) from the latent at the input of step cfg.start_step to the last step's output:
    the sampler that the inversion inverts. Returns the final latent (level ᾱ_0), not its Tweedie estimate."""
    c, uc = _embeddings(z, c, uc)
    triples = schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)
    for i in range(cfg.start_step, cfg.steps):
        t, a, a_prev = triples[i]
        eps = guided_eps(prior, z, t, uc, c, cfg.cfg_guidance)
        z = ddim_step(tweedie(z, eps, a), eps, a_prev)
        if callback:
            callback({"i": i, "steps": cfg.steps, "t": t, "z": z})
    return z


@torch.no_grad()
def implicit_residual(prior, infos, cfg, *, c, uc):
    """Mean over inverted steps of ‖z − F(z)‖/‖z‖ per image, (B,): how far each step's answer is from solving
    the implicit equation. `infos` are the dicts the inversion passed to its callback. One ε̂ call per step."""
    triples = schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)
    errors = []
    for info in infos:
        t, a, a_prev = triples[info["i"]]
        z, z_next = info["z"], info["z_next"]
        if a != a_prev:
            emb_c, emb_uc = _embeddings(z, c, uc)
            gap = z - implicit_map(prior, z_next, t, a, a_prev, emb_c, emb_uc, cfg.cfg_guidance)(z)
            errors.append(gap.flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1))
    return torch.stack(errors).mean(0) if errors else torch.zeros(len(infos[0]["z"]) if infos else 0)


def first_step_at(triples, t):
    """Index of the first sampler step whose timestep is ≤ t (the last step if none is)."""
    return next((i for i, (step_t, _, _) in enumerate(triples) if step_t <= t), len(triples) - 1)


def measurement_start(prior, op, y, inversion, invert_t, level, *, c, uc, generator=None):
    """encode(A⁺y) inverted by RNRI under `inversion`'s sampler down to its first step with t ≤ invert_t, then
    re-noised to the level ᾱ = `level` (renoised_inversion): a solver's start made from the measurement."""
    triples = schedule(prior.alphas_cumprod, inversion.steps, inversion.official_shift)
    inversion = dataclasses.replace(inversion, start_step=first_step_at(triples, invert_t))
    z0 = prior.encode(op.pinv(y), generator)
    return renoised_inversion(prior, z0, inversion, level, c=c, uc=uc, generator=generator)


def renoised_inversion(prior, z0, inversion, level, *, c, uc, generator=None):
    """z0 inverted by RNRI down to the input of sampler step inversion.start_step, then re-noised with fresh noise
    from that step's level ᾱ_s up to the level ᾱ = `level` ≤ ᾱ_s: a draw of q(z_level | z_s)."""
    z = rnri(prior, z0, inversion, c=c, uc=uc, generator=generator)
    reached = schedule(prior.alphas_cumprod, inversion.steps, inversion.official_shift)[inversion.start_step][1]
    if level > reached:
        raise ConfigError("the inversion must reach at least the noise level of the start: re-noising only adds noise")
    keep = level / reached
    return keep ** 0.5 * z + (1 - keep) ** 0.5 * randn(z.shape, generator, z.device).to(z)


def warm_start(prior, op, y, cfg, *, c, uc, generator=None):
    """EXPERIMENTAL solver start (cfg.init == "inversion"): (z, first step) with z the RNRI inversion of
    encode(A⁺y), under the solver's triples and guidance, down to timestep cfg.init_invert_t, re-noised with fresh
    noise up to the solver's first step, the first with t ≤ cfg.init_t.

    Measured on the exact bed (assets/inversion.md): no setting lowers TReg's residual; a deterministic start
    (init_invert_t = init_t) costs more noise predictions than the plain start and takes the text's choice from
    DPS (prompt accuracy 0%); re-noised starts save steps, but re-noising encode(A⁺y) without inverting
    (init_invert_t = 1, SDEdit) does exactly as well for less. Hence the solvers' default is init = "noise"."""
    triples = schedule(prior.alphas_cumprod, cfg.steps, cfg.official_shift)
    if cfg.init_invert_t > cfg.init_t:
        raise ConfigError(f"init_invert_t ({cfg.init_invert_t}) must not exceed init_t ({cfg.init_t}): "
                          "re-noising only adds noise")
    first = first_step_at(triples, cfg.init_t)
    inversion = InversionConfig(steps=cfg.steps, cfg_guidance=cfg.cfg_guidance, official_shift=cfg.official_shift)
    z = measurement_start(prior, op, y, inversion, cfg.init_invert_t, triples[first][1], c=c, uc=uc,
                          generator=generator)
    return z, first


@torch.no_grad()
def evaluate(prior, x, z0, z, infos, cfg, *, c, uc):
    """Per-image round-trip measures (B,) of an inversion z of z0 = encode(x), and the regenerated latents."""
    back = regenerate(prior, z, cfg, c=c, uc=uc)
    recon, reference = prior.decode(back).float(), prior.decode(z0).float()
    return back, {"latent_error": (back - z0).flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1),
                  "round_trip_psnr": psnr(recon.clamp(-1, 1), reference.clamp(-1, 1)),
                  "input_psnr": psnr(recon.clamp(-1, 1), x.float()),
                  "implicit_residual": implicit_residual(prior, infos, cfg, c=c, uc=uc)}


@torch.no_grad()
def round_trip_psnr(prior, x, cfg, *, c, uc, generator=None):
    """The diagnostic of `solve.py --round_trip`: invert images x with the prompt, regenerate, and return the PSNR
    (B,) of the regenerated image against decode(encode(x))."""
    z0 = prior.encode(x, generator)
    back = regenerate(prior, invert(prior, z0, cfg, c=c, uc=uc, generator=generator), cfg, c=c, uc=uc)
    return psnr(prior.decode(back).float().clamp(-1, 1), prior.decode(z0).float().clamp(-1, 1))
