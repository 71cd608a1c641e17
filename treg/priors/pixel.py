"""Pixel-space priors behind the latent prior interface (treg.priors): the "latent" is the image itself.

Both priors here have latent_channels = 3, vae_scale_factor = 1 and identity encode/decode, so every solver runs on
them unchanged (pixel TReg is TReg with the identity VAE) and the fast solvers (treg.solvers.fast) use the operator
itself.

    PixelDiffusion        a diffusers UNet2DModel with its scheduler (the DDPM pipeline folders on the hub, e.g.
                          google/ddpm-celebahq-256); unconditional, so `eps` ignores the text and `embed` returns
                          a placeholder; it has no CLIP image encoder, so adaptive negation is unavailable.
    AnalyticPixelPrior    the analytic prior (treg.priors.analytic) with the identity "VAE": a Gaussian mixture
                          directly on pixels, with its exact ε, text weights and exact posterior
                          (treg.priors.posterior works as is).
"""
import json
from pathlib import Path

import torch

from treg import hub
from treg.config import SAMPLES
from treg.priors.analytic import AnalyticPrior
from treg.priors.base import PriorUnavailable


class PixelDiffusion:
    """An unconditional pixel-space diffusion model (diffusers UNet2DModel, ε-prediction) as a prior."""

    latent_channels = 3
    vae_scale_factor = 1
    has_text = False  # solve.py warns when a prompt or cfg_guidance > 0 would be ignored

    def __init__(self, unet, alphas_cumprod):
        if unet.config.in_channels != 3 or unet.config.out_channels not in (3, 6):
            raise ValueError(f"a pixel prior needs a 3-channel UNet2DModel, got {unet.config.in_channels} in, "
                             f"{unet.config.out_channels} out")
        self.unet = unet.requires_grad_(False).eval()
        self.alphas_cumprod = alphas_cumprod.float()
        self.dtype = unet.dtype

    @property
    def device(self):
        return self.unet.device

    def encode(self, x, generator=None):
        """The identity: the image is the diffusion variable."""
        return x.float()

    def decode(self, z):
        return z.float()

    def decode_adjoint(self, x):
        """The adjoint of decode (the identity), as for the analytic prior's linear decoder."""
        return x

    def embed(self, prompts):
        """A zero placeholder (N, 1, 1): the model has no text, and CFG's two branches then coincide."""
        return torch.zeros(len(prompts), 1, 1, device=self.device)

    def eps(self, z, t, e):
        """ε̂(x_t, t); the text embedding `e` is ignored. A learned-variance UNet (6 channels) gives its ε half."""
        return self.unet(z.to(self.dtype), t).sample[:, :3].float()

    def image_features(self, x):
        raise PriorUnavailable("adaptive negation needs text, and a pixel diffusion model has none; drop --use_AN")

    def enable_gradient_checkpointing(self):
        self.unet.enable_gradient_checkpointing()


def is_pixel_folder(folder):
    """True for a diffusers folder holding an unconditional UNet2DModel (the DDPM pipeline layout)."""
    config = Path(folder) / "unet" / "config.json"
    return bool(folder) and config.is_file() and json.loads(config.read_text()).get("_class_name") == "UNet2DModel"


def load_pixel_prior(source, local_only, device, dtype):
    """PixelDiffusion from a located folder or hub id (treg.hub.locate) with unet/ and scheduler/."""
    from diffusers import DDPMScheduler, UNet2DModel
    unet = hub.load(UNet2DModel, source, local_only, "unet of the model", subfolder="unet", torch_dtype=dtype)
    scheduler = hub.load(DDPMScheduler, source, local_only, "scheduler of the model", weights=False,
                         subfolder="scheduler")
    return PixelDiffusion(unet.to(device), scheduler.alphas_cumprod)


class AnalyticPixelPrior(AnalyticPrior):
    """AnalyticPrior on pixels: identity "VAE", components in image space (module docstring of treg.priors.analytic).

    With `shared_scale`, μ_(i,k) = A⁺(A x_i) + (I − A⁺A) x_k for A = ×s SR, now in closed form (A⁺ is exact)."""

    latent_channels = 3
    vae_scale_factor = 1

    @classmethod
    def from_folder(cls, folder=SAMPLES, shared_scale=16, std=0.03, **kwargs):
        return super().from_folder(folder, shared_scale=shared_scale, std=std, **kwargs)

    def encode(self, x, generator=None):
        return x

    def decode(self, z):
        return z

    def decode_adjoint(self, x):
        return x

    def _split(self, x, mu, scale):
        """(A⁺A x, (I − A⁺A) μ) in float64 for A = ×scale SR, with its closed-form pseudo-inverse."""
        from treg.operators import build_operator
        op = build_operator("super_resolution", x.shape[-1], scale=scale).to(x.device).double()
        x, mu = x.double(), mu.double()
        return op.pinv(op.A(x)), mu - op.pinv(op.A(mu))
