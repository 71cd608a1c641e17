"""Tiny (and full-size) random Stable-Diffusion-shaped model folders, built offline: the builders behind
`python -m treg tiny` (treg.commands.tiny, whose --help describes the three kinds) and the tests' fixtures."""
import json
import tempfile
import time
from pathlib import Path

import torch

MERGES = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n</w>", "c a", "ca t</w>", "d o", "do g</w>"]
WIDTH = 32  # text hidden size = UNet cross-attention width = CLIP image projection width


def _byte_chars():
    """The GPT-2/CLIP byte-to-unicode table, in table order."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def write_tokenizer_files(folder):
    """vocab.json and merges.txt for a valid CLIPTokenizer with a 524-token vocabulary."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")


def build_tiny_sd(folder, seed=0):
    """Write a tiny SD folder (vae, unet, text_encoder, tokenizer, scheduler, image_encoder) and return its path."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers.utils import logging as transformers_logging
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    folder = Path(folder)
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as files:
        write_tokenizer_files(files)
        tokenizer = CLIPTokenizer.from_pretrained(files, model_max_length=77)
    torch.manual_seed(seed)
    parts = {
        "unet": UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=WIDTH, attention_head_dim=8),
        "vae": AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
            norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=256, scaling_factor=0.18215),
        "text_encoder": CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=5,
            num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=WIDTH,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)),
        "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=4, projection_dim=WIDTH)),
        "scheduler": DDIMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"),
    }
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


CLIP_VOCAB = 49408  # CLIP's BPE: 256 bytes, 256 end-of-word bytes, 48894 merges, 2 special tokens


def write_clip_sized_tokenizer_files(folder):
    """vocab.json and merges.txt of CLIP's size (49408 entries) without CLIP's vocabulary: the merges pair byte
    characters in a fixed order (a+b, then a+b</w>), so every merge result is in the vocabulary."""
    chars = _byte_chars()
    n_merges = CLIP_VOCAB - 2 * len(chars) - 2
    pairs = [(a, b + end) for end in ("", "</w>") for a in chars for b in chars][:n_merges]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in pairs) + "\n")


# SD-1.5's component configs (stable-diffusion-v1-5/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json,
# scheduler/scheduler_config.json) and openai/clip-vit-large-patch14's vision tower; every other field is the
# library default, which equals the published file.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 projection_dim=768)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def full_size_parts():
    """{name: constructor} of the full-size models; call each under `torch.device("meta")` to count without
    allocating."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    # SD's published special ids 0/1/2 (stale, unlike the tokenizer's): with eos_token_id 2 the encoder pools at
    # the highest id, which is <|endoftext|> in both vocabularies
    text = CLIPTextConfig(**SD15_TEXT, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return {"unet": lambda: UNet2DConditionModel(**SD15_UNET), "vae": lambda: AutoencoderKL(**SD15_VAE),
            "text_encoder": lambda: CLIPTextModel(text),
            "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14_VISION))}


def build_full_size_sd(folder, seed=0, dtype=torch.float16, log=print, device="cpu"):
    """Write a random SD-1.5-sized folder (one model in memory at a time, initialised on `device`: an accelerator
    draws the 1.37 G random values in seconds) and return its path."""
    from transformers import CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    folder = Path(folder)
    transformers_logging.disable_progress_bar()
    for k, (name, make) in enumerate(full_size_parts().items()):
        start = time.perf_counter()
        torch.manual_seed(seed + k)
        with torch.device(device):
            model = make().to(dtype)
        model.save_pretrained(folder / name)
        log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
            f"{time.perf_counter() - start:.0f} s")
        del model
    write_clip_sized_tokenizer_files(folder / "tokenizer")
    CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77).save_pretrained(folder / "tokenizer")
    # SD-1.5's file as published: a PNDM config that also carries DDIM's clip_sample (which PNDM does not take)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", **SD15_SCHEDULER, "trained_betas": None}, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def folder_bytes(folder):
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def build_tiny_pixel(folder, seed=0):
    """Write a tiny DDPM-pipeline folder (unet: UNet2DModel, scheduler: DDPMScheduler, ~0.2M parameters)."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=8, attention_head_dim=8).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"]}))
    return folder
