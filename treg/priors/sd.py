"""Stable Diffusion (v1.x layout) behind the prior interface of treg.priors.base; treg.priors.load builds it."""
import warnings

import torch.nn.functional as F

from treg.priors.base import PriorUnavailable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class StableDiffusion:
    """Stable Diffusion (v1.x layout) behind the prior interface. Build with `load_prior` or from components."""

    def __init__(self, vae, unet, text_encoder, tokenizer, alphas_cumprod, image_encoder=None):
        self.vae, self.unet, self.text_encoder, self.tokenizer = vae, unet, text_encoder, tokenizer
        self.image_encoder = image_encoder
        for module in (vae, unet, text_encoder, image_encoder):
            if module is not None:
                module.requires_grad_(False).eval()
        self.alphas_cumprod = alphas_cumprod.float()
        self.latent_channels = unet.config.in_channels
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling = vae.config.scaling_factor
        self.dtype = unet.dtype
        if image_encoder is not None and image_encoder.config.projection_dim != text_encoder.config.hidden_size:
            raise PriorUnavailable(
                f"the image encoder's projection width {image_encoder.config.projection_dim} must equal the text "
                f"hidden size {text_encoder.config.hidden_size} (adaptive negation dots the two)")

    @property
    def device(self):
        return self.unet.device

    @property
    def size_multiple(self):
        """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def encode(self, x, generator=None):
        """(B,3,H,W) in [-1,1] -> (B,4,H/8,W/8): a sample of the VAE posterior, as the official code does."""
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return (dist.sample(generator) * self.scaling).float()

    def decode(self, z):
        """(B,4,h,w) -> (B,3,8h,8w) float32."""
        return self.vae.decode(z.to(self.dtype) / self.scaling).sample.float()

    def embed(self, prompts):
        """Last hidden states of the CLIP text encoder, padded to the tokenizer's length: (N, 77, D)."""
        length = self.tokenizer.model_max_length
        for prompt in prompts:
            n = len(self.tokenizer(prompt).input_ids)
            if n > length:
                warnings.warn(f"prompt has {n} tokens, truncated to {length}: {prompt[:60]!r}...")
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device)).last_hidden_state.float()

    def eps(self, z, t, e):
        return self.unet(z.to(self.dtype), t, encoder_hidden_states=e.to(self.dtype)).sample.float()

    def image_features(self, x):
        """Projected CLIP image embedding, with the official preprocessing (bicubic resize, [0,1], CLIP mean/std)."""
        if self.image_encoder is None:
            raise PriorUnavailable("adaptive negation needs a CLIP image encoder; "
                                   "load the prior with image_encoder=...")
        size = self.image_encoder.config.image_size
        x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=True)
        x = (x + 1) / 2
        mean, std = x.new_tensor(CLIP_MEAN)[:, None, None], x.new_tensor(CLIP_STD)[:, None, None]
        x = ((x - mean) / std).to(self.device, self.image_encoder.dtype)
        return self.image_encoder(pixel_values=x).image_embeds.float()

    def enable_gradient_checkpointing(self):
        """Trade compute for memory when backpropagating through the UNet and the VAE decoder (DPS, PSLD, P2L)."""
        self.unet.enable_gradient_checkpointing()
        self.vae.enable_gradient_checkpointing()
