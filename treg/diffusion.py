"""Diffusion maths shared by every solver: pure tensor functions, no models.

Notation: ᾱ_t is `alphas_cumprod[t]`; a DDIM step goes from timestep t (ᾱ = `a`) to t_prev (ᾱ' = `a_prev`).
"""
import torch


def timesteps(steps, num_train=1000, offset=1):
    """SD-1.5 DDIM grid, "leading" spacing with `steps_offset`: for 200 steps 996, 991, …, 1."""
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}], got {steps}")
    ratio = num_train // steps
    return [ratio * i + offset for i in reversed(range(steps))]


def schedule(alphas_cumprod, steps, official_shift=True):
    """[(t, ᾱ, ᾱ')] for each DDIM step, t descending; ᾱ' of the last step is ᾱ_0 (set_alpha_to_one=False).

    official_shift=True reproduces the official TReg code, which prepends 1.0 to `alphas_cumprod`: the UNet is
    told t while the update uses ᾱ_{t-1} and ᾱ_{t-1-skip}, and the last step (t = 1) becomes a no-op with
    ᾱ = ᾱ' = ᾱ_0. official_shift=False is diffusers' DDIMScheduler convention (ᾱ_t, ᾱ_{t-skip}).
    """
    ac = alphas_cumprod.double().cpu()
    final = ac[0].item()
    shift = 1 if official_shift else 0
    skip = len(ac) // steps
    out = []
    for t in timesteps(steps, len(ac)):
        a = ac[t - shift].item()
        prev = t - skip - shift
        out.append((t, a, ac[prev].item() if prev >= 0 else final))
    return out


def tweedie(z, eps, a):
    """Predicted clean latent ẑ0 = (z − √(1−ᾱ)·ε̂)/√ᾱ (DDIM eq. 12)."""
    return (z - (1 - a) ** 0.5 * eps) / a ** 0.5


def ddim_step(z0, eps, a_prev, sigma=0.0, noise=None):
    """z_{t'} = √ᾱ'·ẑ0 + √(1−ᾱ'−σ²)·ε̂ + σ·n (DDIM eq. 12; σ = 0 is deterministic)."""
    z = a_prev ** 0.5 * z0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    return z if sigma == 0 else z + sigma * noise


def cfg(prior, z, t, uc, c, w):
    """Classifier-free guidance ε_uc + w·(ε_c − ε_uc), skipping the branch that w makes irrelevant.

    w = 0 is "without text" (null prompt only); w = 1 is the conditional prediction. (The official code returns
    the null prediction at w = 1; that is a bug we do not keep.)
    """
    if w == 0:
        return prior.eps(z, t, uc)
    if w == 1:
        return prior.eps(z, t, c)
    eps_uc, eps_c = prior.eps(torch.cat([z, z]), t, torch.cat([uc, c])).chunk(2)
    return eps_uc + w * (eps_c - eps_uc)


def randn(shape, generator, device):
    """Standard normal noise drawn on the generator's device and moved to `device`.

    `generator` may be one torch.Generator or a list with one per batch element, so that image i draws the same
    noise whatever batch it is solved in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device) for g in generator])
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device).to(device)
