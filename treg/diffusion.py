"""Diffusion maths shared by every solver: pure tensor functions, no models.

Notation: ᾱ_t is `alphas_cumprod[t]`; a DDIM step goes from timestep t (ᾱ = `a`) to t_prev (ᾱ' = `a_prev`).
"""
import torch


def _leading(steps, num_train, offset):
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}], got {steps}")
    ratio = num_train // steps
    return [ratio * i + offset for i in reversed(range(steps))]


def timesteps(steps, num_train=1000, offset=1):
    """SD-1.5 DDIM grid, "leading" spacing with `steps_offset`: for 200 steps 996, 991, …, 1.

    At steps = num_train the grid's top is t = num_train, past the last trained timestep: diffusers' DDIMScheduler
    lists it too (set_timesteps(1000): 1000, 999, …, 1) and then fails in its own step() on alphas_cumprod[1000], so
    there is nothing to agree with. It is clamped to num_train − 1: 1000 steps are 999, 999, 998, …, 1 (the model's
    domain is [0, num_train); what the repeated 999 means for the levels is in `schedule`)."""
    return [min(t, num_train - 1) for t in _leading(steps, num_train, offset)]


def schedule(alphas_cumprod, steps, official_shift=True):
    """[(t, ᾱ, ᾱ')] for each DDIM step, t descending; ᾱ' of the last step is ᾱ_0 (set_alpha_to_one=False).

    official_shift=True reproduces the official TReg code, which prepends 1.0 to `alphas_cumprod`: the UNet is
    told t while the update uses ᾱ_{t-1} and ᾱ_{t-1-skip}, and the last step (t = 1) becomes a no-op with
    ᾱ = ᾱ' = ᾱ_0. official_shift=False is diffusers' DDIMScheduler convention (ᾱ_t, ᾱ_{t-skip}).

    Levels come from the unclamped grid, and an index past the last trained timestep is clamped (see `timesteps`).
    At 1000 steps with the shift that keeps the official code's levels ᾱ_999, ᾱ_998, …, ᾱ_0 exactly (its shifted
    array has 1001 entries), the first step telling the model t = 999 where the official code tells it 1000, which
    no prior here is defined at. Without the shift, ᾱ_1000 does not exist: the first step runs from ᾱ_999 to ᾱ_999,
    a no-op, and the other 999 are diffusers' steps t = 999, …, 1.
    """
    ac = alphas_cumprod.double().cpu()
    n, shift = len(ac), 1 if official_shift else 0
    skip = n // steps
    level = lambda k: ac[min(k, n - 1)].item() if k >= 0 else ac[0].item()
    return [(min(t, n - 1), level(t - shift), level(t - skip - shift)) for t in _leading(steps, n, 1)]


def tweedie(z, eps, a):
    """Predicted clean latent ẑ0 = (z − √(1−ᾱ)·ε̂)/√ᾱ (DDIM eq. 12)."""
    return (z - (1 - a) ** 0.5 * eps) / a ** 0.5


def ddim_step(z0, eps, a_prev, sigma=0.0, noise=None):
    """z_{t'} = √ᾱ'·ẑ0 + √(1−ᾱ'−σ²)·ε̂ + σ·n (DDIM eq. 12; σ = 0 is deterministic)."""
    z = a_prev ** 0.5 * z0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    return z if sigma == 0 else z + sigma * noise


def guided_eps(prior, z, t, uc, c, w):
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
