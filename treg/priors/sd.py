"""Latent priors: the only place diffusers and transformers models appear.

Every prior exposes the same small interface, which is all the solvers ever see:

    alphas_cumprod: Tensor            # (T,) float32, the training noise schedule
    latent_channels, vae_scale_factor # latent shape is (B, latent_channels, H / f, W / f)
    encode(x, generator=None) -> z    # (B,3,H,W) in [-1,1] -> latent; stochastic where the model is
    decode(z) -> x                    # latent -> (B,3,H,W) float32
    embed(prompts: list[str]) -> e    # (N, L, D) text embeddings
    eps(z, t: int, e) -> Tensor       # noise prediction, no guidance inside; z and e share the batch size
    image_features(x) -> f            # (B, D) image embedding used by TReg's adaptive negation

Solver maths runs in float32; the prior casts to the model dtype on the way in and back to float32 on the way out.
"""
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from treg import hub
from treg.hub import ModelUnavailable

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the official runwayml/... id was withdrawn
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PriorUnavailable(ModelUnavailable):
    """A prior could not be loaded; the message is one line saying what is missing and what to do."""


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
            raise PriorUnavailable("adaptive negation needs a CLIP image encoder; load the prior with image_encoder=...")
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


def _model_folder(source, local_only):
    """The local folder of a located model (a hub model's cache snapshot, downloading its unet config if needed)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(source, "unet/config.json", local_files_only=local_only)).parent.parent
    except Exception as err:  # the hub client raises many kinds; the located model lacks a unet/
        raise PriorUnavailable(f"'{source}' has no unet/config.json: not a diffusers Stable Diffusion or pixel "
                               f"(UNet2DModel) model ({type(err).__name__})") from None


def load_prior(model=DEFAULT_MODEL, device="cpu", dtype=torch.float32, image_encoder=None):
    """A prior for `model`: 'analytic', 'analytic-pixel', a Hugging Face hub id or a local diffusers folder (Stable
    Diffusion, or an unconditional UNet2DModel with its scheduler: a pixel prior, treg.pixel).

    image_encoder: None (no CLIP image encoder; adaptive negation off), or a hub id / local folder of a
    `CLIPVisionModelWithProjection`; the string 'auto' means `<model>/image_encoder` when that folder exists,
    else openai/clip-vit-large-patch14.
    """
    if model == "analytic":
        from treg.analytic import AnalyticPrior
        return AnalyticPrior.from_folder().to(device)
    from treg.pixel import AnalyticPixelPrior, is_pixel_folder, load_pixel_prior
    if model == "analytic-pixel":
        return AnalyticPixelPrior.from_folder().to(device)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    try:
        source, local_only = hub.locate(model, "model", "--model", probe="unet/config.json")
        if Path(source).is_dir() and not (Path(source) / "unet").is_dir():
            raise PriorUnavailable(f"'{model}' is not a diffusers Stable Diffusion or pixel (UNet2DModel) folder "
                                   "(no unet/ inside)")
        if is_pixel_folder(_model_folder(source, local_only)):
            return load_pixel_prior(source, local_only, device, dtype)
        parts = {name: hub.load(cls, source, local_only, f"{name} of the model", weights=weights, subfolder=name, **kw)
                 for name, cls, weights, kw in [
                     ("vae", AutoencoderKL, True, {"torch_dtype": dtype}),
                     ("unet", UNet2DConditionModel, True, {"torch_dtype": dtype}),
                     ("text_encoder", CLIPTextModel, True, {"torch_dtype": dtype}),
                     ("tokenizer", CLIPTokenizer, False, {}),
                     ("scheduler", DDIMScheduler, False, {})]}
        encoder = None
        if image_encoder == "auto":
            local = Path(source) / "image_encoder"
            image_encoder = str(local) if local.is_dir() else DEFAULT_IMAGE_ENCODER
        if image_encoder is not None:
            where, local_encoder = hub.locate(image_encoder, "CLIP image encoder", "--image_encoder")
            encoder = hub.load(CLIPVisionModelWithProjection, where, local_encoder, "CLIP image encoder",
                               torch_dtype=dtype).to(device)
    except ModelUnavailable as err:
        raise PriorUnavailable(str(err)) from None
    return StableDiffusion(parts["vae"].to(device), parts["unet"].to(device), parts["text_encoder"].to(device),
                           parts["tokenizer"], parts["scheduler"].alphas_cumprod, encoder)
