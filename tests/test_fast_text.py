"""Text that chooses, in the fast solvers (issue 18 item 3): on a bed where y cannot tell two modes apart, cci and
pigdm at their defaults must land in the prompted mode and fit y as the exact posterior does, on the analytic prior
and on the same prior behind a wrapper that hides everything but the prior interface (the path they take on Stable
Diffusion)."""
import dataclasses

import torch

from treg.operators import build_operator
from treg.priors.analytic import load_image
from treg.priors.posterior import ambiguous_prior, exact_posterior, landed_component, sample
from treg.config import SAMPLES
from treg.solvers import configure
from treg.solvers.latent import residual_norm

NULL_PROMPT = "out of focus, depth of field"
CAPTIONS = ("a photo of a dog", "a cup of coffee on a wooden table")
SIGMA = 0.01
SIZE = 64


class Foreign:
    """The prior interface only (treg.priors.base): no decode_adjoint, no means, so no exact latent operator."""

    def __init__(self, prior):
        self._prior = prior
        self.alphas_cumprod = prior.alphas_cumprod
        self.latent_channels, self.vae_scale_factor = prior.latent_channels, prior.vae_scale_factor
        self.device = prior.device

    def encode(self, x, generator=None):
        return self._prior.encode(x, generator)

    def decode(self, z):
        return self._prior.decode(z)

    def embed(self, prompts):
        return self._prior.embed(prompts)

    def eps(self, z, t, e):
        return self._prior.eps(z, t, e)

    def image_features(self, x):
        return self._prior.image_features(x)


def text_bed(seed=0):
    """×16 SR at 64 px of the cat, σ = 0.01; two components that differ only in the null space of A∘decode."""
    op = build_operator("super_resolution", SIZE, scale=16).double()
    prior = ambiguous_prior(op, SIZE, SAMPLES / "cat_1.jpg", list(CAPTIONS), SIGMA,
                            generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(seed)
    z = prior.means(8, 8)[:1]
    y = op.A(prior.decode(z)) + SIGMA * torch.randn(op.A(prior.decode(z)).shape, generator=g, dtype=torch.float64)
    return prior, op, y


def solve_text(name, prior, op, y, prompt, seed, **changes):
    fn, cfg = configure(name, noise_scale=SIGMA)
    cfg = dataclasses.replace(cfg, **changes)
    uc, c = prior.embed([NULL_PROMPT, prompt]).double().chunk(2)
    return fn(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(seed))
