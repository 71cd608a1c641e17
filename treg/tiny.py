"""A tiny, randomly initialised Stable-Diffusion-shaped model folder, built offline.

It has SD-1.5's geometry (4 latent channels, VAE downsampling 8, 77-token CLIP text encoder, the SD noise schedule)
and about 1.6M parameters, so the whole CLI and every solver can be exercised on a CPU without downloading weights.
Its images are meaningless. Usage: `python -m treg.tiny DIR` writes a folder that `--model DIR` loads;
`python -m treg.tiny --pixel DIR` writes a tiny unconditional pixel model instead (UNet2DModel and DDPMScheduler,
the layout of google/ddpm-celebahq-256), a pixel prior (treg.pixel).
"""
import argparse
import json
import sys
import tempfile
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
        "_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m treg.tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="output folder (created; an existing model folder is overwritten)")
    p.add_argument("--pixel", action="store_true", help="a tiny unconditional pixel model instead of a tiny SD")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    args = p.parse_args(argv)
    if args.folder.exists() and not args.folder.is_dir():
        sys.exit(f"error: {args.folder} is a file, not a folder")
    try:
        print((build_tiny_pixel if args.pixel else build_tiny_sd)(args.folder, args.seed))
    except OSError as err:
        sys.exit(f"error: cannot write {err.filename or args.folder}: {err.strerror or err}")


if __name__ == "__main__":
    main()
