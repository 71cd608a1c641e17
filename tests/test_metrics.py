"""Metrics: PSNR/SSIM against scikit-image, LPIPS with random weights in torchvision's file layout, CLIP score with
a tiny random CLIP, and the one-line MetricUnavailable path for every missing model."""
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from treg.metrics import LPIPS, CLIPScore, MetricUnavailable, build_metrics, load_lpips, psnr, ssim
from treg.solvers.latent import residual_norm


def to_tensor(img01):
    """(H,W,3) in [0,1] -> (1,3,H,W) float32 in [-1,1]."""
    return torch.from_numpy(np.ascontiguousarray(img01)).permute(2, 0, 1)[None].float() * 2 - 1


@pytest.fixture(scope="module")
def astronaut():
    """A 64x64 crop (and a 48x64 one) of skimage's astronaut in [0,1], plus noisy and blurred copies."""
    rng = np.random.default_rng(0)
    a = data.astronaut()[100:164, 180:244].astype(np.float32) / 255
    noisy = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    blurred = gaussian_filter(a, sigma=(2, 2, 0)).astype(np.float32)
    return a, noisy, blurred


# ----------------------------------------------------------------------------------------------------------- PSNR/SSIM
def test_psnr_hand_values():
    ref = torch.zeros(2, 3, 8, 8)
    x = torch.stack([torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), -0.02)])  # errors 0.2 and 0.02 on [-1,1]
    # range 2: 10 log10(4 / 0.04) = 20 dB, 10 log10(4 / 0.0004) = 40 dB
    assert torch.allclose(psnr(x, ref), torch.tensor([20.0, 40.0]), atol=1e-4)
    assert psnr(x, ref).shape == (2,) and psnr(x, ref).dtype == torch.float32


def test_psnr_matches_skimage_and_is_inf_for_identical(astronaut):
    a, noisy, blurred = astronaut
    got = psnr(torch.cat([to_tensor(noisy), to_tensor(blurred)]), torch.cat([to_tensor(a)] * 2))
    want = [peak_signal_noise_ratio(a, b, data_range=1.0) for b in (noisy, blurred)]
    assert np.allclose(got.numpy(), want, atol=1e-3)
    assert torch.isinf(psnr(to_tensor(a), to_tensor(a))).all()  # documented choice: identical images give +inf


@pytest.mark.parametrize("crop", [(slice(None), slice(None)), (slice(0, 48), slice(None))], ids=["64x64", "48x64"])
def test_ssim_matches_skimage(astronaut, crop):
    a, noisy, blurred = (im[crop] for im in astronaut)
    got = ssim(torch.cat([to_tensor(noisy), to_tensor(blurred)]), torch.cat([to_tensor(a)] * 2))
    want = [structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for b in (noisy, blurred)]
    assert got.shape == (2,)
    assert np.allclose(got.numpy(), want, atol=1e-4), (got, want)
    assert want[0] < 0.9 and want[1] < 0.95  # the copies really differ, so agreement is not trivial


def test_ssim_of_identical_images_is_one(astronaut):
    x = to_tensor(astronaut[0])
    assert torch.allclose(ssim(x, x), torch.ones(1), atol=1e-6)


def test_residual():
    y = torch.zeros(2, 3, 4, 4)
    Ax = torch.zeros(2, 3, 4, 4)
    Ax[0, 0, 0, 0], Ax[0, 1, 1, 1], Ax[1] = 3.0, 4.0, 0.5
    identity = types.SimpleNamespace(A=lambda x: x)  # residual_norm(op, y, x) = ‖y − A x‖ per image
    assert torch.allclose(residual_norm(identity, y, Ax), torch.tensor([5.0, 0.5 * 48 ** 0.5]))


# --------------------------------------------------------------------------------------------------------------- LPIPS
# torchvision's layouts written out independently of treg.metrics: features index -> conv weight shape.
TORCHVISION_CONVS = {
    "alex": {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)},
    "vgg": {i: (o, c, 3, 3) for i, (c, o) in zip(
        [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
        [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
         (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)])},
}
LIN_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def write_lpips_files(folder, net, seed=0):
    """Random weights saved under the real file names with the real files' keys (plus a classifier key)."""
    g = torch.Generator().manual_seed(seed)
    trunk = {}
    for i, shape in TORCHVISION_CONVS[net].items():
        fan_in = shape[1] * shape[2] * shape[3]
        trunk[f"features.{i}.weight"] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        trunk[f"features.{i}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    trunk["classifier.6.bias"] = torch.zeros(10)  # the real files carry a classifier LPIPS must ignore
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LIN_CHANNELS[net])}
    torch.save(trunk, folder / FILES[net])
    torch.save(lin, folder / f"lpips_{net}_v0.1.pth")
    return trunk, lin


def reference_lpips(trunk, lin, net, x, ref):
    """LPIPS v0.1 written out with functional ops: scaling layer, 5 ReLU taps, unit-normalise, weighted squared
    difference summed over channels, spatial mean, sum over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def conv_relu(h, i, stride=1, pad=1):
        return F.relu(F.conv2d(h, trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"], stride, pad))

    def taps(h):
        h = (h - shift) / scale
        if net == "alex":
            t1 = conv_relu(h, 0, 4, 2)
            t2 = conv_relu(F.max_pool2d(t1, 3, 2), 3, 1, 2)
            t3 = conv_relu(F.max_pool2d(t2, 3, 2), 6)
            t4 = conv_relu(t3, 8)
            return [t1, t2, t3, t4, conv_relu(t4, 10)]
        out = []
        for k, block in enumerate([[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]):
            h = F.max_pool2d(h, 2) if k else h
            for i in block:
                h = conv_relu(h, i)
            out.append(h)
        return out

    d = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(ref))):
        a, b = a / (a.norm(dim=1, keepdim=True) + 1e-10), b / (b.norm(dim=1, keepdim=True) + 1e-10)
        d = d + ((a - b) ** 2 * lin[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return d


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    for net in ("alex", "vgg"):
        write_lpips_files(folder, net)
    return folder


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loads_torchvision_layout_and_behaves_like_a_distance(lpips_dir, net):
    model = LPIPS(net, lpips_dir / FILES[net], lpips_dir / f"lpips_{net}_v0.1.pth")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    dxy, dyx, dxx = model(x, y), model(y, x), model(x, x)
    assert dxy.shape == (2,)
    assert torch.equal(dxx, torch.zeros(2))
    assert torch.allclose(dxy, dyx) and (dxy > 0).all()
    assert (model(x, -x) > dxy).all()  # a larger perturbation is farther
    trunk, lin = torch.load(lpips_dir / FILES[net]), torch.load(lpips_dir / f"lpips_{net}_v0.1.pth")
    assert torch.allclose(dxy, reference_lpips(trunk, lin, net, x, y), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loading_is_strict(tmp_path, net):
    trunk, lin = write_lpips_files(tmp_path, net)
    del trunk[f"features.{max(TORCHVISION_CONVS[net])}.bias"]
    torch.save(trunk, tmp_path / FILES[net])
    with pytest.raises(RuntimeError, match="Missing key"):
        load_lpips(net, tmp_path)
    write_lpips_files(tmp_path, net)
    lin["lin5.model.1.weight"] = torch.rand(1, 8, 1, 1)
    torch.save(lin, tmp_path / f"lpips_{net}_v0.1.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_lpips(net, tmp_path)


def test_lpips_default_location_is_torch_hub_checkpoints(tmp_path, monkeypatch):
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    write_lpips_files(tmp_path / "hub" / "checkpoints", "alex")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert LPIPS("alex")(x, -x).item() > 0


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_missing_file_raises_one_line(tmp_path, net):
    with pytest.raises(MetricUnavailable) as err:
        load_lpips(net, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and FILES[net] in msg and str(tmp_path) in msg
    write_lpips_files(tmp_path, net)
    (tmp_path / FILES[net]).unlink()
    with pytest.raises(MetricUnavailable, match=FILES[net]):
        LPIPS(net, backbone_path=tmp_path / FILES[net], lin_path=tmp_path / f"lpips_{net}_v0.1.pth")


def test_build_metrics_skips_unavailable_lpips(tmp_path):
    fns, warnings = build_metrics(["psnr", "lpips"], device="cpu", lpips_dir=tmp_path)
    assert list(fns) == ["psnr"]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "vgg16-397923af.pth" in warnings[0]
    x = torch.zeros(1, 3, 8, 8)
    assert torch.allclose(fns["psnr"](x, x + 0.2, None), torch.tensor([20.0]), atol=1e-4)


def test_build_metrics_with_weights(lpips_dir):
    fns, warnings = build_metrics(["psnr", "ssim", "lpips", "lpips_vgg", "lpips_alex"], device="cpu",
                                  lpips_dir=lpips_dir)
    assert warnings == [] and set(fns) == {"psnr", "ssim", "lpips", "lpips_vgg", "lpips_alex"}
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = x.flip(-1)
    values = {name: fn(x, y, "a photo") for name, fn in fns.items()}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in values.values())
    assert torch.equal(values["lpips"], values["lpips_vgg"]) and not torch.equal(values["lpips"], values["lpips_alex"])


def test_build_metrics_rejects_unknown_names():
    with pytest.raises(ValueError, match="psnr, ssim, lpips, lpips_vgg, lpips_alex, clip"):
        build_metrics(["psnr", "fid"], device="cpu")


# ---------------------------------------------------------------------------------------------------------- CLIP score
def write_clip_tokenizer_files(folder, merges=("t h", "th e</w>", "a n", "an d</w>", "o f</w>", "c a", "ca t</w>")):
    """vocab.json / merges.txt in CLIP's BPE layout: 256 byte characters, the same with </w>, merges, specials."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(tokens)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                         pad_token_id=vocab - 1, **common),
        vision_config=dict(image_size=32, patch_size=4, **common), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def reference_clip_score(model, tokenizer, pixels, prompts):
    """100 * max(cos, 0) straight from get_image_features / get_text_features on already-preprocessed pixels."""
    def features(out):  # transformers v5 returns a model output, v4 a tensor
        return out if torch.is_tensor(out) else out.pooler_output
    tok = tokenizer(prompts, padding=True, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = features(model.get_image_features(pixel_values=(pixels - mean) / std))
        txt = features(model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))
    return 100 * F.cosine_similarity(img, txt, dim=-1).clamp(min=0)


def test_clip_score_matches_independent_computation(tiny_clip, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, model, tokenizer = tiny_clip
    score = CLIPScore(str(folder))
    g = torch.Generator().manual_seed(0)
    prompts = ["a photo of the cat", "the dog and the cat", "cat", "a cat of the dog"]
    for size in (32, 64):  # at the model's image size the resize is the identity; at 64 it is a bicubic downscale
        x = torch.rand(4, 3, size, size, generator=g) * 2 - 1
        got = score(x, prompts)
        pixels = F.interpolate((x + 1) / 2, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
        want = reference_clip_score(model, tokenizer, pixels, prompts)
        assert got.shape == (4,) and torch.isfinite(got).all() and ((got >= 0) & (got <= 100)).all()
        assert torch.allclose(got, want, atol=1e-4), (got, want)
    x = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1  # non-square: short-side resize and centre crop
    assert torch.allclose(score(x, "the cat"), score(x, ["the cat", "the cat"]))
    assert score(x, "the cat").shape == (2,)


def test_build_metrics_clip(tiny_clip, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fns, warnings = build_metrics(["clip"], device="cpu", clip_model=str(tiny_clip[0]))
    assert warnings == []
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert fns["clip"](x, x, "the cat").shape == (3,)


@pytest.mark.parametrize("model", ["missing-folder", "nobody-xyz/no-such-clip"])
def test_clip_unavailable_raises_one_line(tmp_path, monkeypatch, model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = str(tmp_path / model) if model == "missing-folder" else model
    with pytest.raises(MetricUnavailable) as err:
        CLIPScore(source)
    expected = "does not exist" if model == "missing-folder" else "hf download nobody-xyz/no-such-clip"
    assert "\n" not in str(err.value) and source in str(err.value) and expected in str(err.value)
    fns, warnings = build_metrics(["psnr", "clip"], device="cpu", clip_model=source)
    assert list(fns) == ["psnr"] and len(warnings) == 1 and source in warnings[0]


# ------------------------------------------------------------------------------------------------ official metric style
def official_script_view(x):
    """An independent rendering of the official pipeline for (1,3,H,W) [-1,1]: clamp to [0,1], per-image min-max
    stretch and 8-bit PNG as torchvision's save_image(normalize=True), then read back as uint8 (H,W,3)."""
    from PIL import Image
    img = ((x[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-5)
    buffer = __import__("io").BytesIO()
    Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return np.asarray(Image.open(buffer))


def test_official_style_psnr_is_the_official_scripts(astronaut):
    a, noisy, _ = astronaut
    x, ref = to_tensor(noisy * 0.6 + 0.1), to_tensor(a)  # a contrast change that the stretch undoes
    official = build_metrics(["psnr"], device="cpu", style="official")[0]["psnr"](x, ref).item()
    expected = peak_signal_noise_ratio(official_script_view(ref).astype(np.float64),
                                       official_script_view(x).astype(np.float64), data_range=255)
    assert official == pytest.approx(expected, abs=1e-3)
    ours = build_metrics(["psnr"], device="cpu")[0]["psnr"](x, ref).item()
    assert official > ours + 3  # ours sees the contrast change, the stretched images hide it


def test_official_style_lpips_is_fed_unit_range_images(lpips_dir, astronaut):
    a, _, blurred = astronaut
    x, ref = to_tensor(blurred), to_tensor(a)
    fn = build_metrics(["lpips"], device="cpu", lpips_dir=lpips_dir, style="official")[0]["lpips"]
    model = load_lpips("vgg", lpips_dir)
    as_unit = lambda v: torch.from_numpy(official_script_view(v) / 255).permute(2, 0, 1)[None].float()
    assert torch.allclose(fn(x, ref), model(as_unit(x), as_unit(ref)), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(fn(x, ref), model(x, ref), rtol=1e-2)


def test_unknown_metrics_style_is_an_error():
    with pytest.raises(ValueError, match="ours, official"):
        build_metrics(["psnr"], device="cpu", style="paper")
