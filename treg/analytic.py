"""An analytic latent diffusion prior: a Gaussian mixture behind the prior interface, with an exact ε-prediction.

"VAE". Factor 8, 4 channels, linear: each latent pixel z ∈ R⁴ decodes to one 8×8×3 patch x = g·U z, where
U ∈ R^{192×4} has orthonormal columns and the gain is g = 8; encode(x) = Uᵀx / g per patch, so encode∘decode = I
exactly and decode's true adjoint is g·Uᵀ = g²·encode (`decode_adjoint`). The columns of U are fixed, not learnt:
    0  luminance (1,1,1)/√3,       constant over the patch  ┐ together: the patch's mean colour
    1  red − blue (1,0,−1)/√2,     constant over the patch  │ (encode∘decode on them is 8×8 average
    2  green − magenta (1,−2,1)/√6, constant over the patch  ┘  pooling of each colour)
    3  luminance ramp from the top-left to the bottom-right corner (DCT-II basis 1 along x plus along y)
g = 8 makes a latent a per-pixel amplitude (a grey patch of value m has z₀ = √3·m), so latents of natural images
are of order one like SD's 0.18215-scaled latents (channel stds 0.71, 0.37, 0.09, 0.11 for the samples at 512²).

Prior. z0 ~ Σ_k π_k(e) N(μ_k, s²I), one component per captioned image, μ_k = encode(image_k) at the requested size;
s = 0.1 latent units keeps the components far apart: ‖μ_j − μ_k‖/s ≥ 28 for the samples at 32², ≥ 600 at 512².
The forward process keeps a mixture, z_t ~ Σ_k π_k N(√ᾱ μ_k, v I) with v = ᾱs² + 1 − ᾱ, hence
    ε̂(z_t) = −√(1−ᾱ)·∇log p_t(z_t) = √(1−ᾱ)/v · (z_t − √ᾱ Σ_k r_k μ_k),   r_k ∝ π_k N(z_t; √ᾱ μ_k, v I),
which is (z_t − √ᾱ E[z0|z_t]) / √(1−ᾱ) with E[z0|z_t, k] = μ_k + (√ᾱ s²/v)(z_t − √ᾱ μ_k).

Text. embed(prompt) is a hashed bag of words: every lower-cased word except a few stop words maps to a ±1 vector
in R^D read from shake_256(word); their sum is unit-normalised and repeated over L = 77 tokens, D = 768 (SD-1.5's
shapes; the width also keeps distinct words nearly orthogonal, |cos| ≈ 1/√768). Mixture weights
π(e) = softmax_k(β·cos(mean over tokens of e, c_k)), c_k = embedding of caption k. β = 5 puts ≥ 0.98 on a
caption's own component, keeps the TReg null prompt "out of focus, depth of field" within 0.05 of uniform for the
samples, and an empty prompt (zero embedding) gives exactly uniform weights.
"""
import hashlib
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

PATCH = 8
GAIN = 8.0
TOKENS, WIDTH = 77, 768
STOP_WORDS = frozenset("a an the of on in at to by for with and or from is are".split())
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def sd15_alphas_cumprod(num_train=1000):
    """SD-1.5 "scaled_linear" schedule in float32 as diffusers builds it: β = linspace(√0.00085, √0.012)², ᾱ = Π(1−β)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_train, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


def patch_basis():
    """U as a (3, 8, 8, 4) float64 tensor (colour, row, column, latent channel); as (192, 4) it is orthonormal."""
    flat = torch.full((PATCH, PATCH), 1 / PATCH, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * torch.arange(PATCH, dtype=torch.float64) + 1) / (2 * PATCH))
    ramp = (c[:, None] + c[None, :]) / PATCH  # Σc = 0 and Σc² = 4, so Σ(c_i + c_j)² = 64
    colours = torch.tensor([[1, 1, 1], [1, 0, -1], [1, -2, 1], [1, 1, 1]], dtype=torch.float64)
    colours = F.normalize(colours, dim=1)
    spatial = torch.stack([flat, flat, flat, ramp])
    return torch.einsum("kc,kpq->cpqk", colours, spatial)


def load_image(path, height, width=None):
    """(1, 3, height, width) in [-1, 1]: RGB, bicubic resize until it covers the target, centre crop."""
    width = width or height
    img = Image.open(path).convert("RGB")
    scale = max(height / img.height, width / img.width)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def word_vector(word):
    """A ±1 vector in R^D from shake_256(word): stable across processes and versions (unlike Python's hash)."""
    bits = np.unpackbits(np.frombuffer(hashlib.shake_256(word.encode()).digest(WIDTH // 8), dtype=np.uint8))
    return torch.from_numpy(bits.astype(np.float32) * 2 - 1)


class AnalyticPrior:
    """Gaussian-mixture latent prior with a closed-form ε; see the module docstring for the maths.

    Give either `image_paths` (means encoded lazily from the images at each requested latent size) or explicit
    `means` (K, 4, h, w) (then only that size exists). `std` is s, `beta` the text-weight sharpness β.
    """

    latent_channels = 4
    vae_scale_factor = PATCH

    def __init__(self, captions, *, means=None, image_paths=None, std=0.1, beta=5.0):
        if (means is None) == (image_paths is None):
            raise ValueError("give exactly one of `means` or `image_paths`")
        count = len(means) if means is not None else len(image_paths)
        if len(captions) != count:
            raise ValueError(f"{len(captions)} captions for {count} components")
        self.captions, self.std, self.beta = list(captions), std, beta
        self.image_paths = None if image_paths is None else [Path(p) for p in image_paths]
        self.device = torch.device("cpu")
        self.alphas_cumprod = sd15_alphas_cumprod()
        self.basis = patch_basis()
        self.caption_embeddings = self.embed(self.captions)[:, 0]  # (K, D), unit rows
        self._means = {} if means is None else {tuple(means.shape[-2:]): means.detach().clone()}

    @classmethod
    def from_folder(cls, folder=SAMPLES, **kwargs):
        """One component per entry of `folder/captions.yaml` (file name → caption)."""
        folder = Path(folder)
        captions = yaml.safe_load((folder / "captions.yaml").read_text())
        return cls(list(captions.values()), image_paths=[folder / name for name in captions], **kwargs)

    def to(self, device):
        self.device = torch.device(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        self.basis = self.basis.to(device)
        self.caption_embeddings = self.caption_embeddings.to(device)
        self._means = {size: mu.to(device) for size, mu in self._means.items()}
        return self

    # "VAE"
    def encode(self, x, generator=None):
        """(B,3,H,W) → (B,4,H/8,W/8): z = Uᵀx/g per patch. Deterministic, so `generator` is unused."""
        return self.decode_adjoint(x) / GAIN ** 2

    def decode(self, z):
        """(B,4,h,w) → (B,3,8h,8w): x = g·U z per patch."""
        b, _, h, w = z.shape
        x = GAIN * torch.einsum("bkhw,cpqk->bchpwq", z, self.basis.to(z))
        return x.reshape(b, 3, h * PATCH, w * PATCH)

    def decode_adjoint(self, x):
        """The exact adjoint of decode, g·Uᵀ per patch (= g²·encode): what Mᵀ = decodeᵀ∘Aᵀ needs."""
        b, c, H, W = x.shape
        if H % PATCH or W % PATCH:
            raise ValueError(f"image size {H}x{W} is not a multiple of {PATCH}")
        patches = x.reshape(b, c, H // PATCH, PATCH, W // PATCH, PATCH)
        return GAIN * torch.einsum("bchpwq,cpqk->bkhw", patches, self.basis.to(x))

    # text
    def embed(self, prompts):
        """(N, 77, 768): unit-normalised hashed bag of words, the same vector at every token (zero if no words)."""
        rows = []
        for prompt in prompts:
            words = [w for w in re.findall(r"[a-z0-9]+", prompt.lower()) if w not in STOP_WORDS]
            rows.append(F.normalize(sum(map(word_vector, words), torch.zeros(WIDTH)), dim=0))
        return torch.stack(rows)[:, None].repeat(1, TOKENS, 1).to(self.device)

    def log_weights(self, e):
        """log π(e), (B, K): log softmax_k(β·cos(mean over tokens of e, c_k)); a zero embedding gives uniform."""
        q = F.normalize(e.mean(1), dim=-1)
        return torch.log_softmax(self.beta * q @ self.caption_embeddings.to(q).T, dim=-1)

    # mixture
    def means(self, h, w):
        """μ (K, 4, h, w): the encoded images at 8h × 8w pixels, computed once per latent size."""
        if (h, w) not in self._means:
            if self.image_paths is None:
                raise ValueError(f"this prior has means only at latent sizes {list(self._means)}, not {(h, w)}")
            x = torch.cat([load_image(p, PATCH * h, PATCH * w) for p in self.image_paths])
            self._means[(h, w)] = self.encode(x.to(self.device))
        return self._means[(h, w)]

    def _log_joint(self, z, a, e):
        """log π_k + log N(z; √ᾱ μ_k, v I), (B, K), with v = ᾱs² + 1 − ᾱ; also μ and v. ᾱ = 1 is the clean prior."""
        mu = self.means(*z.shape[-2:]).to(z)
        v = a * self.std ** 2 + 1 - a
        sq = (z[:, None] - a ** 0.5 * mu[None]).flatten(2).pow(2).sum(-1)
        log_pi = -math.log(len(mu)) if e is None else self.log_weights(e).to(z)
        return log_pi - sq / (2 * v) - 0.5 * z[0].numel() * math.log(2 * math.pi * v), mu, v

    def _abar(self, t):
        if not 0 <= int(t) < len(self.alphas_cumprod):
            raise ValueError(f"timestep {t} outside [0, {len(self.alphas_cumprod)})")
        return float(self.alphas_cumprod[int(t)])

    def log_prob_t(self, z, t, e):
        """log p_t(z_t | e), (B,): the density of the noised mixture Σ_k π_k(e) N(√ᾱ_t μ_k, v_t I)."""
        return torch.logsumexp(self._log_joint(z, self._abar(t), e)[0], dim=1)

    def eps(self, z, t, e):
        """Exact ε̂(z_t) = √(1−ᾱ)/v · (z_t − √ᾱ Σ_k r_k μ_k) = −√(1−ᾱ)·∇log p_t(z_t); differentiable in z and e."""
        a = self._abar(t)
        log_joint, mu, v = self._log_joint(z, a, e)
        mu_bar = torch.einsum("bk,kchw->bchw", torch.softmax(log_joint, dim=1), mu)
        return (1 - a) ** 0.5 / v * (z - a ** 0.5 * mu_bar)

    def responsibilities(self, z0, e=None):
        """p(k | z0, e), (B, K), under the clean mixture (uniform weights when e is None)."""
        return torch.softmax(self._log_joint(z0, 1.0, e)[0], dim=1)

    def image_features(self, x):
        """(B, D): caption embeddings weighted by the responsibilities of encode(x) under uniform weights."""
        r = self.responsibilities(self.encode(x))
        return r @ self.caption_embeddings.to(r)
