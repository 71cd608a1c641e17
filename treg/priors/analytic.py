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

Prior. z0 ~ Σ_k π_k(e) N(μ_k, s²I) with s = `std` latent units (0.1 by default, 0.03 for `from_folder`).
The forward process keeps a mixture, z_t ~ Σ_k π_k N(√ᾱ μ_k, v I) with v = ᾱs² + 1 − ᾱ, hence
    ε̂(z_t) = −√(1−ᾱ)·∇log p_t(z_t) = √(1−ᾱ)/v · (z_t − √ᾱ Σ_k r_k μ_k),   r_k ∝ π_k N(z_t; √ᾱ μ_k, v I),
which is (z_t − √ᾱ E[z0|z_t]) / √(1−ᾱ) with E[z0|z_t, k] = μ_k + (√ᾱ s²/v)(z_t − √ᾱ μ_k).

Components (`from_folder`: components that only the text can choose under ×16 super-resolution). With one
component per image, μ_k = encode(image_k), the components are far apart in every direction: any measurement, even
SR×16, identifies its image and the prompt changes nothing. So, at each latent size h×w, with M = A∘decode,
A = ×16 bicubic SR at 8h×8w pixels, N = I − M⁺M the projector onto M's null space, and images x_1..x_K,
    μ_(i,k) = M⁺(A x_i) + N·encode(x_k),     one component per pair (i, k), captioned with caption k:
the low-resolution content of image i (exactly what SR×16 measures of it: M μ_(i,k) = A x_i) plus the detail of
image k that SR×16 cannot see (edges, texture and colour below the 16-pixel scale). μ_(k,k) is image k up to
the part of it outside the decoder's range. Measuring image i by SR×16 thus selects the low-resolution group i
and leaves the K details exactly ambiguous: the exact posterior weights within the group equal the text weights
π(e), and each posterior mean is y's content plus a detail. Without text (w = 0; the null prompt weighs the details
within 0.05 of uniform) a solver lands on a prior-weighted detail, the true prompt restores the true image, and
another prompt gives an equally measurement-consistent image with another image's detail (the paper's "ice cream →
Christmas tree"). Why not one shared low-resolution content for all components (μ̄ + N(encode x_k − μ̄))? Then no
component fits the measurement of a real image, and since s is small, TReg's last, unguided 15% of steps pull the
solution back to μ̄'s content (SR×16 of cat_1.jpg at 512², s = 0.1: residual 22× the noise floor).
M⁺b is the minimum-norm solution of MᵀM u = Mᵀb, found by CG from u = 0 (~25 iterations for all 2K right-hand
sides, ~0.5 s of one CPU core at 512²; cached per latent size). Blur and inpainting see part of the detail, so
there the measurement can prefer a component. When ×16 does not divide 8h (×16 at 32 px, a 2×2 measurement, is
fine) the largest of ×8, ×4 that divides it is used; for a non-square size the components are the plain image
means, μ_(i,k) = encode(x_k); `shared_scales` records what each size got. `AnalyticPrior(captions, means=...)`
uses given means as they are.
s = 0.03 for `from_folder`: TReg stops data consistency at 85% of its steps and its output keeps about 0.7·s of
prior noise in every latent direction, visible (pixel noise ≈ 1.15·s) and measured (with README flags, SR×16 of
cat_1.jpg at 512²: residual 3.4× the noise floor at s = 0.1, 1.3× at s = 0.03); the details of a group stay
≥ 40 s apart at 32², ≥ 340 s at 512².

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

from treg.config import SAMPLES
from treg.linalg import conjugate_gradient

PATCH = 8
GAIN = 8.0
TOKENS, WIDTH = 77, 768
STOP_WORDS = frozenset("a an the of on in at to by for with and or from is are".split())


def sd15_alphas_cumprod(num_train=1000):
    """SD-1.5 "scaled_linear" schedule in float32 as diffusers builds it: β = linspace(√0.00085, √0.012)²,
    ᾱ = Π(1−β)."""
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

    Give either explicit `means` (K, 4, h, w), used as they are and only at that size (test beds), or
    `image_paths`, one per caption, whose means are built lazily at each requested latent size: the encoded
    images, or with `shared_scale` the K² components μ_(i,k) (low resolution of image i under ×shared_scale SR,
    detail of image k; component index i·K + k, caption k) of the module docstring: built so that an SR×16
    measurement of a sample fixes its low-resolution content and leaves only the text to choose the detail (with one
    component per image the measurement alone picks the image and the prompt changes nothing). `std` is s, `beta`
    the text-weight sharpness β. `captions` and `pairs` list each component's caption and (i, k).
    """

    latent_channels = 4
    vae_scale_factor = PATCH

    def __init__(self, captions, *, means=None, image_paths=None, std=0.1, beta=5.0, shared_scale=None):
        if (means is None) == (image_paths is None):
            raise ValueError("give exactly one of `means` or `image_paths`")
        count = len(means) if means is not None else len(image_paths)
        if len(captions) != count:
            raise ValueError(f"{len(captions)} captions for {count} {'components' if means is not None else 'images'}")
        if shared_scale is not None and image_paths is None:
            raise ValueError("shared_scale needs `image_paths` (explicit means are used as given)")
        self.std, self.beta, self.shared_scale = std, beta, shared_scale
        self.pairs = [(i, k) for i in range(count) for k in range(count)] if shared_scale else None
        self.captions = [captions[k] for _, k in self.pairs] if shared_scale else list(captions)
        self.shared_scales = {}  # latent size → the SR scale its components share (None: plain image means)
        self.image_paths = None if image_paths is None else [Path(p) for p in image_paths]
        self.device = torch.device("cpu")
        self.alphas_cumprod = sd15_alphas_cumprod()
        self.basis = patch_basis()
        self.caption_embeddings = self.embed(self.captions)[:, 0]  # (K, D), unit rows
        self._means = {} if means is None else {tuple(means.shape[-2:]): means.detach().clone()}

    @classmethod
    def from_folder(cls, folder=SAMPLES, shared_scale=16, std=0.03, **kwargs):
        """Components from the images of `folder/captions.yaml` (file name → caption), sharing ×16 SR content."""
        folder = Path(folder)
        captions = yaml.safe_load((folder / "captions.yaml").read_text())
        return cls(list(captions.values()), image_paths=[folder / name for name in captions],
                   shared_scale=shared_scale, std=std, **kwargs)

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
        """log π(e), (B, K) float64: log softmax_k(β·cos(mean over tokens of e, c_k)); a zero embedding gives uniform.
        float64 so that the weights do not depend on the batch a prompt is embedded in (a float32 reduction's order
        does, by ~1e-7, on some CPUs)."""
        q = F.normalize(e.double().mean(1), dim=-1)
        return torch.log_softmax(self.beta * q @ self.caption_embeddings.to(q).T, dim=-1)

    # mixture
    def means(self, h, w):
        """μ (K, 4, h, w) at 8h × 8w pixels, computed once per latent size (see the class docstring)."""
        if (h, w) not in self._means:
            if self.image_paths is None:
                raise ValueError(f"this prior has means only at latent sizes {list(self._means)}, not {(h, w)}")
            f = self.vae_scale_factor
            x = torch.cat([load_image(p, f * h, f * w) for p in self.image_paths]).to(self.device)
            mu = self.encode(x)
            scale = self._shared_scale(h, w)
            if scale is not None:
                low, detail = self._split(x, mu, scale)
                mu = (low[:, None] + detail[None]).flatten(0, 1).to(mu.dtype)  # (K·K, 4, h, w), index i·K + k
            elif self.pairs is not None:
                mu = mu[[k for _, k in self.pairs]]
            self.shared_scales[(h, w)] = scale
            self._means[(h, w)] = mu
        return self._means[(h, w)]

    def _shared_scale(self, h, w):
        """The largest SR scale ≤ shared_scale dividing the (square) image size 8h, or None."""
        from treg.operators import SuperResolution
        if self.shared_scale is None or h != w:
            return None
        size = self.vae_scale_factor * h
        return max((s for s in SuperResolution.scales if s <= self.shared_scale and size % s == 0),
                   default=None)

    def _split(self, x, mu, scale, cg_iters=200, cg_rtol=1e-10):
        """(M⁺A x, N μ) in float64 for M = A∘decode, A = ×scale SR: M⁺b is the minimum-norm solution of
        MᵀM u = Mᵀb, which CG from u = 0 finds (its iterates stay in range(Mᵀ)); N μ = μ − M⁺(Mμ)."""
        from treg.operators import build_operator
        op = build_operator("super_resolution", x.shape[-1], scale=scale).to(x.device).double()
        # A X = m X mᵀ per colour and decode is per 8×8 patch, so M and Mᵀ contract the latent with m and the
        # patch basis directly, never forming the image (15× faster than op.A(decode(z)); equal to 1e-15)
        m, basis = op.matrix.view(-1, mu.shape[-2], PATCH), self.basis.to(op.matrix)  # (H/s, h, 8), (3, 8, 8, 4)
        forward = lambda z: GAIN * torch.einsum("rhp,cpqk,bkhw,swq->bcrs", m, basis, z, m)
        adjoint = lambda y: GAIN * torch.einsum("rhp,cpqk,bcrs,swq->bkhw", m, basis, y, m)
        normal = lambda u: adjoint(forward(u))
        b = adjoint(torch.cat([op.A(x.double()), forward(mu.double())]))
        tol = cg_rtol * b.flatten(1).norm(dim=1).min()
        u = conjugate_gradient(normal, b, torch.zeros_like(b), cg_iters, tol)
        return u[:len(x)], mu.double() - u[len(x):]

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
