"""Image-quality metrics on tensors: PSNR, SSIM, LPIPS and CLIP score (the measurement
residual is treg.solvers.latent.residual_norm).

Every metric takes float tensors (B,3,H,W) in [-1,1] *as given* (no clamping, no uint8 rounding; clamp first if an
output can leave the range) and returns a (B,) float tensor, one value per image, on the input's device.

Nothing here downloads: LPIPS needs torchvision's ImageNet trunk plus the lpips package's v0.1 "lin" layers as local
files, CLIP score a cached or local CLIP folder. A missing piece raises `MetricUnavailable` with a one-line message
saying what to put where; `build_metrics` turns that into a warning so a run goes on without that metric.
"""
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from treg import hub

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # what torchmetrics' CLIPScore uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MetricUnavailable(RuntimeError):
    """A metric's weights are missing; the message is one line saying which file or model to provide and where."""


def psnr(x, ref):
    """Peak signal-to-noise ratio in dB with data range 2 on [-1,1] (= range 1 on [0,1]); inf for identical images."""
    mse = (x - ref).double().pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse)).float()  # mse = 0 gives +inf, kept so a perfect result is visible


def _gaussian_window(size, sigma, like):
    r = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def ssim(x, ref, win_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM of Wang et al. (2004) on [0,1] images, Gaussian window, population covariance, mean over channels.

    Matches skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1): skimage filters with reflect padding and then crops (win_size-1)//2 pixels per side, so the kept
    region is exactly what a 'valid' convolution computes and no padding is needed here.
    """
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size} pixels, got {tuple(x.shape[-2:])}")
    x, ref = (x + 1) / 2, (ref + 1) / 2
    c = x.shape[1]
    g = _gaussian_window(win_size, sigma, x)
    gy, gx = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t):  # separable depthwise Gaussian, 'valid' borders
        return F.conv2d(F.conv2d(t, gy, groups=c), gx, groups=c)

    mx, my = blur(x), blur(ref)
    vx, vy = blur(x * x) - mx * mx, blur(ref * ref) - my * my
    vxy = blur(x * ref) - mx * my
    c1, c2 = k1 ** 2, k2 ** 2  # data range 1
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def official_view(x):
    """What the official metric script reads, from (B,3,H,W) images in [0,1]: each image min-max stretched to [0,1]
    on its own (torchvision's save_image(normalize=True), which wrote every official PNG) and quantised to 8 bits."""
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    stretched = (x - lo) / (hi - lo).clamp(min=1e-5)
    return (stretched * 255 + 0.5).clamp(0, 255).floor() / 255


# ---------------------------------------------------------------------------------------------------------------- LPIPS
# Trunks laid out as torchvision's `features` Sequential (same indices), so its ImageNet checkpoints load by name.
# A layer is ("C", in, out, kernel, stride, padding), ("M", kernel, stride) or "R" (ReLU).
def _vgg16_layers():
    layers, c = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        layers += [("M", 2, 2)] if v == "M" else [("C", c, v, 3, 1, 1), "R"]
        c = c if v == "M" else v
    return layers


NETS = {  # layers up to the last tap, indices of the tapped ReLUs, torchvision checkpoint file
    "alex": ([("C", 3, 64, 11, 4, 2), "R", ("M", 3, 2), ("C", 64, 192, 5, 1, 2), "R", ("M", 3, 2),
              ("C", 192, 384, 3, 1, 1), "R", ("C", 384, 256, 3, 1, 1), "R", ("C", 256, 256, 3, 1, 1), "R"],
             (1, 4, 7, 9, 11), "alexnet-owt-7be5be79.pth"),                 # relu1 .. relu5
    "vgg": (_vgg16_layers(), (3, 8, 15, 22, 29), "vgg16-397923af.pth"),     # relu1_2, 2_2, 3_3, 4_3, 5_3
}
_SHIFT, _SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)  # LPIPS input scaling layer


def _locate(net, directory=None):
    """Where LPIPS(net) looks for (backbone, lin): `directory` (default $TORCH_HOME/hub/checkpoints, torchvision's
    cache), the lin layers also inside an installed lpips / torchmetrics package. Paths may not exist."""
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
    folder = Path(directory) if directory is not None else Path(torch.hub.get_dir()) / "checkpoints"
    backbone, lin = folder / NETS[net][2], folder / f"lpips_{net}_v0.1.pth"
    if lin.is_file():
        return backbone, lin
    # The same lin file ships inside lpips and torchmetrics; find_spec locates a package without importing it
    # (importing lpips would import torchvision).
    for pkg, rel in (("lpips", f"weights/v0.1/{net}.pth"),
                     ("torchmetrics", f"functional/image/lpips_models/{net}.pth")):
        spec = importlib.util.find_spec(pkg)
        roots = (spec.submodule_search_locations or []) if spec else []
        hits = [Path(r) / rel for r in roots if (Path(r) / rel).is_file()]
        if hits:
            return backbone, hits[0]
    return backbone, lin


def _require(net, backbone, lin):
    missing = []
    if not Path(backbone).is_file():
        arch = "AlexNet" if net == "alex" else "VGG16"
        missing.append(f"{Path(backbone).name} in {Path(backbone).parent} (torchvision's ImageNet {arch}, "
                       f"https://download.pytorch.org/models/{NETS[net][2]})")
    if not Path(lin).is_file():
        missing.append(f"{Path(lin).name} in {Path(lin).parent} (a copy of lpips/weights/v0.1/{net}.pth from the "
                       f"lpips package; or pip install --no-deps lpips)")
    if missing:
        raise MetricUnavailable(f"LPIPS({net}) needs " + " and ".join(missing))


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018) with an AlexNet or VGG16 trunk: forward(x, ref) -> (B,) distances, inputs
    in [-1,1]. Missing paths default to `_locate(net)`; both files load with strict key checking."""

    def __init__(self, net="vgg", backbone_path=None, lin_path=None):
        super().__init__()
        found = _locate(net)
        backbone_path, lin_path = backbone_path or found[0], lin_path or found[1]
        _require(net, backbone_path, lin_path)
        layers, self.taps = NETS[net][0], NETS[net][1]
        self.features = nn.Sequential(*[nn.ReLU() if l == "R" else nn.MaxPool2d(*l[1:]) if l[0] == "M"
                                        else nn.Conv2d(*l[1:]) for l in layers])
        for k, t in enumerate(self.taps):  # each tap is a ReLU right after a conv with layers[t - 1][2] channels
            # slot 0 was a Dropout in lpips (identity at test time); keeping it keeps the keys `linK.model.1.weight`
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Identity(), nn.Conv2d(layers[t - 1][2], 1, 1, bias=False))
            self.add_module(f"lin{k}", lin)
        trunk = torch.load(backbone_path, map_location="cpu", weights_only=True)  # lpips' files hold CUDA tensors
        trunk = {k: v for k, v in trunk.items() if k.startswith("features.")}  # drop torchvision's classifier
        self.load_state_dict({**trunk, **torch.load(lin_path, map_location="cpu", weights_only=True)}, strict=True)
        for k in range(len(self.taps)):  # trained lin weights are >= 0; clamping keeps any distance >= 0
            getattr(self, f"lin{k}").model[1].weight.data.clamp_(min=0)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def _taps(self, x):
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit-normalise channels
        return out

    def forward(self, x, ref):
        x, ref = x.to(self.shift), ref.to(self.shift)
        d = 0
        for k, (a, b) in enumerate(zip(self._taps(x), self._taps(ref))):
            d = d + getattr(self, f"lin{k}").model((a - b) ** 2).mean((2, 3))  # 1x1 lin, spatial mean
        return d.flatten()


def load_lpips(net="vgg", directory=None, device="cpu"):
    """LPIPS(net) from `directory` (default: torchvision's hub cache); MetricUnavailable names any missing file."""
    return LPIPS(net, *_locate(net, directory)).to(device)


# ----------------------------------------------------------------------------------------------------------- CLIP score
class CLIPScore:
    """torchmetrics-style CLIP score: 100 · max(cos(image embedding, text embedding), 0), per image.

    `model` is a hub id or a local folder holding a CLIPModel and CLIPTokenizer (save_pretrained layout).
    Images are preprocessed in torch: [-1,1] -> [0,1] -> bicubic antialiased resize of the short side to the
    model's image size and a centre crop (as CLIP's processor does) -> CLIP mean/std.
    """

    def __init__(self, model=DEFAULT_CLIP, device="cpu", dtype=torch.float32):
        from transformers import CLIPModel, CLIPTokenizer
        try:
            source, local_only = hub.locate(model, "CLIP model", "--clip_model")
            self.model = hub.load(CLIPModel, source, local_only, "CLIP model").to(device, dtype).eval()
            self.tokenizer = hub.load(CLIPTokenizer, source, local_only, "CLIP tokenizer", weights=False)
        except hub.ModelUnavailable as err:
            raise MetricUnavailable(f"CLIP score needs a CLIPModel and CLIPTokenizer: {err}") from None
        self.model.requires_grad_(False)
        self.size = self.model.config.vision_config.image_size
        self.max_len = self.model.config.text_config.max_position_embeddings

    def preprocess(self, x):
        """(B,3,H,W) in [-1,1] -> CLIP pixel values (B,3,S,S)."""
        x = ((x.float() + 1) / 2).clamp(0, 1)  # the image as it would be saved
        h, w = x.shape[-2:]
        s = self.size
        x = F.interpolate(x, size=(max(s, round(h * s / min(h, w))), max(s, round(w * s / min(h, w)))),
                          mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
        x = x[..., top:top + s, left:left + s]
        return (x - x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CLIP_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, x, prompts):
        prompts = [prompts] * len(x) if isinstance(prompts, str) else list(prompts)
        p = self.model.device
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        # CLIPModel.forward returns unit-norm projected embeddings in transformers v4 and v5 alike
        out = self.model(input_ids=tok.input_ids.to(p), attention_mask=tok.attention_mask.to(p),
                         pixel_values=self.preprocess(x).to(p, self.model.dtype))
        cos = (out.image_embeds.float() * out.text_embeds.float()).sum(-1)
        return (100 * cos.clamp(min=0)).to(x.device)


# ----------------------------------------------------------------------------------------------------------- front door
METRICS = ("psnr", "ssim", "lpips", "lpips_vgg", "lpips_alex", "clip")
STYLES = ("ours", "official")


def build_metrics(names, *, device, clip_model=DEFAULT_CLIP, lpips_dir=None, style="ours"):
    """{name: f(x, ref, prompt) -> (B,)} for the requested metrics, plus one warning line per unavailable one.

    style "ours" scores the [-1,1] tensors as they are. style "official" scores what the official metric script
    scores: both images through `official_view` (per-image min-max stretch, 8 bits), PSNR/SSIM on those, and LPIPS
    fed the stretched [0,1] images where it expects [-1,1] (the script never sets LPIPS' normalize=True). CLIP
    score is the same in both styles (the official script has none).
    """
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {', '.join(METRICS)}")
    if style not in STYLES:
        raise ValueError(f"metrics style must be one of {', '.join(STYLES)}, got {style!r}")
    fns, warnings, nets = {}, [], {}
    for name in dict.fromkeys(names):
        try:
            if name in ("psnr", "ssim"):
                fn = psnr if name == "psnr" else ssim
                fns[name] = lambda x, ref, prompt=None, fn=fn: fn(x.to(device), ref.to(device))
            elif name.startswith("lpips"):
                net = name.partition("_")[2] or "vgg"
                if net not in nets:  # 'lpips' and 'lpips_vgg' share one model
                    nets[net] = load_lpips(net, lpips_dir, device)
                fns[name] = lambda x, ref, prompt=None, m=nets[net]: m(x.to(device), ref.to(device))
            else:
                score = CLIPScore(clip_model, device=device)
                fns[name] = lambda x, ref, prompt, s=score: s(x.to(device), prompt)
        except MetricUnavailable as err:
            warnings.append(f"{name} skipped: {err}")
    if style == "official":
        view = lambda x: official_view(((x.float() + 1) / 2).clamp(0, 1))
        for name, fn in list(fns.items()):
            if name.startswith("lpips"):
                fns[name] = lambda x, ref, prompt=None, fn=fn: fn(view(x), view(ref))
            elif name in ("psnr", "ssim"):
                fns[name] = lambda x, ref, prompt=None, fn=fn: fn(2 * view(x) - 1, 2 * view(ref) - 1)
    return fns, warnings
