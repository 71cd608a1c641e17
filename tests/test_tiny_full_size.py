"""The full-size random SD-1.5 (treg.priors.tiny --full-size) without building it: its configs counted on the meta
device against SD-1.5's published sizes, its CLIP-sized tokenizer, and its folder layout loaded through load_prior."""
import json

import pytest
import torch

from treg.priors import tiny
from treg.priors.load import load_prior

# Parameter counts of the published checkpoints (stable-diffusion-v1-5/stable-diffusion-v1-5's unet, vae and
# text_encoder; openai/clip-vit-large-patch14's vision tower with its 1024→768 projection), from their model cards
# and the diffusers/transformers model summaries.
PUBLISHED = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "image_encoder": 303_966_208}


def test_full_size_configs_have_sd15_parameter_counts_on_meta():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in make().parameters()) for name, make in tiny.full_size_parts().items()}
    assert counts == PUBLISHED


def test_clip_sized_tokenizer_is_a_valid_bpe_of_49408_entries(tmp_path):
    from transformers import CLIPTokenizer
    tiny.write_clip_sized_tokenizer_files(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    ids = tok("a photo of a cat").input_ids
    # merges pair byte characters, so "photo</w>" (5 letters) needs merges of merges it does not have: the
    # word splits into merged pairs, and every id is in range
    assert ids[0] == 49406 and ids[-1] == 49407 and all(0 <= i < 49408 for i in ids)
    merges = (tmp_path / "merges.txt").read_text().splitlines()[1:]
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(merges) == 48894 and all(a + b in vocab for a, b in (m.split(" ") for m in merges))


def test_full_size_folder_layout_loads_through_load_prior(tmp_path, monkeypatch):
    """The builder's writing path with the four models swapped for small ones of the same kinds (the real sizes
    are the meta test's): the folder must load as any SD folder, its PNDM scheduler config as SD-1.5's schedule."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    small = {
        "unet": lambda: UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, norm_num_groups=8,
            layers_per_block=1),
        "vae": lambda: AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=8,
                                     down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)),
        "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=8, projection_dim=16)),
    }
    monkeypatch.setattr(tiny, "full_size_parts", lambda: small)
    folder = tiny.build_full_size_sd(tmp_path / "sd", log=lambda line: None)
    assert {p.name for p in folder.glob("*/*.safetensors")} == {"diffusion_pytorch_model.safetensors",
                                                               "model.safetensors"}
    prior = load_prior(str(folder), "cpu", torch.float32, image_encoder="auto")
    assert prior.image_encoder is not None and prior.unet.dtype == torch.float32
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    assert torch.allclose(prior.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)
    from diffusers import PNDMScheduler
    assert PNDMScheduler.from_pretrained(folder / "scheduler").config.skip_prk_steps  # SD's own sampler loads it
    from safetensors import safe_open
    for weights in folder.glob("*/*.safetensors"):  # fp16 on disk by default
        with safe_open(weights, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_cli_refuses_fp32_without_full_size(tmp_path):
    with pytest.raises(SystemExit, match="--fp32 applies only with --full-size"):
        from treg.commands import tiny as tiny_command
        tiny_command.main([str(tmp_path / "x"), "--fp32"])
