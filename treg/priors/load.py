"""The one loader that turns a --model value into a prior: 'analytic', 'analytic-pixel', a hub id or a local
diffusers folder (Stable Diffusion, or an unconditional UNet2DModel: a pixel prior). diffusers and transformers
are imported only here and in the model wrappers, when a model is loaded."""
from pathlib import Path

import torch

from treg import hub
from treg.config import DEFAULT_MODEL
from treg.hub import ModelUnavailable
from treg.priors.analytic import AnalyticPrior
from treg.priors.base import PriorUnavailable
from treg.priors.pixel import AnalyticPixelPrior, is_pixel_folder, load_pixel_prior
from treg.priors.sd import StableDiffusion

DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"


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
    Diffusion, or an unconditional UNet2DModel with its scheduler: a pixel prior, treg.priors.pixel).

    image_encoder: None (no CLIP image encoder; adaptive negation off), or a hub id / local folder of a
    `CLIPVisionModelWithProjection`; the string 'auto' means `<model>/image_encoder` when that folder exists,
    else openai/clip-vit-large-patch14.
    """
    if model == "analytic":
        return AnalyticPrior.from_folder().to(device)
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
