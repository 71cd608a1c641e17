"""Linear degradation operators y = A x, as torch modules.

Images are (B,3,H,W) tensors in [-1,1]; measurements keep image layout. Every operator has the forward map `A`, its
exact adjoint `At` (⟨A x, y⟩ = ⟨x, Aᵀ y⟩) and the least-norm pseudo-inverse `pinv`. Kernels, masks and matrices are
buffers, so `op.to(device)` and `op.double()` work; each method runs in its input's device and dtype. `measure` adds
the measurement noise: y = op.A(x) + noise_scale·n.

    op = build_operator("super_resolution", 512, scale=16)   # configs/task/*.yaml: operator, params
"""
import dataclasses
import inspect
import math
import types
import typing

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from treg.diffusion import randn
from treg.linalg import conjugate_gradient


@dataclasses.dataclass
class SVD:
    """U diag(s) Vᵀ as functions, for DDRM and closed-form ΠGDM; `op.svd(like)` builds it for images shaped
    like `like`, in its dtype and device. Spectral vectors x̄ = Vᵀx have one shape for the image side and the
    measurement side (`Ut` pads with zeros where s = 0). For SR and inpainting it is A's SVD, A x = U(s · Vt(x));
    the Gaussian blur's is truncated (s below pinv_rtol = 3e-2 of the largest set to 0), so there U(s · Vt(x)) is
    only A's rank-truncated approximation: off by up to 3e-2·s_max in operator norm (3.1e-2 relative for white
    noise through σ = 5 at 64 px), and its pinv is the truncated A⁺ on purpose."""
    Vt: typing.Callable  # x → x̄
    V: typing.Callable  # x̄ → x
    Ut: typing.Callable  # y → ȳ (zero where s = 0)
    U: typing.Callable  # ȳ → y
    singulars: torch.Tensor  # s ≥ 0, broadcastable against x̄; 0 = not measured (or truncated: blur)


def measure(op, x, noise_scale, generators):
    """y = A x + noise_scale·n with n ~ N(0, I) drawn from each image's generator (one per image, or one)."""
    y = op.A(x)
    return y + noise_scale * randn(y.shape, generators, y.device)


class Operator(nn.Module):
    """A linear map; subclasses define A and At, and pinv unless the CG default below is good enough."""

    pinv_iters = 50

    def pinv(self, y):
        """A⁺y = Aᵀ (A Aᵀ)⁻¹ y, the inverse applied by `pinv_iters` CG steps from 0."""
        v = conjugate_gradient(lambda u: self.A(self.At(u)), y, torch.zeros_like(y), self.pinv_iters)
        return self.At(v)


# --- super-resolution --------------------------------------------------------------------------------------------


def keys_cubic(t, a=-0.5):
    """Keys' cubic convolution kernel k(t); a = −0.5 is the usual "bicubic"."""
    t = np.abs(t)
    inner = (a + 2) * t**3 - (a + 3) * t**2 + 1
    outer = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return np.where(t <= 1, inner, np.where(t < 2, outer, 0.0))


def bicubic_decimation_matrix(n, scale):
    """(n/s, n) float64 matrix of antialiased bicubic downsampling by s, symmetric (edge-repeating) boundary.

    Row r is centred on input s·r + (s−1)/2 and has the 4s taps k((m − 2s + 0.5)/s), m = 0..4s−1, normalised to
    sum 1; a tap outside [0, n) folds back as in numpy's 'symmetric' padding (−1 → 0, n → n−1).
    """
    s = scale
    taps = keys_cubic((np.arange(4 * s) - 2 * s + 0.5) / s)
    taps /= taps.sum()
    rows = np.arange(n // s)[:, None]
    cols = np.mod(s * rows + s // 2 + np.arange(-2 * s, 2 * s), 2 * n)
    cols = np.where(cols >= n, 2 * n - 1 - cols, cols)
    matrix = np.zeros((n // s, n))
    np.add.at(matrix, (np.broadcast_to(rows, cols.shape), cols), taps)  # folded taps can share a column
    return matrix


class SuperResolution(Operator):
    """×s bicubic downsampling, Y_c = A_s X_c A_sᵀ per channel (the official `sr_bicubic` for s = 16).

    Boundary: symmetric reflection; equivalently, symmetric-pad by 2s → F.interpolate(bicubic, antialias=True) to
    H/s + 4 → crop 2. Closed-form pinv: P Y Pᵀ with P = A_s⁺ = A_sᵀ (A_s A_sᵀ)⁻¹.
    """

    scales = (4, 8, 16)

    def __init__(self, image_size, scale: int):
        super().__init__()
        if scale not in self.scales:
            raise ValueError(f"super_resolution scale must be one of {self.scales}, got {scale!r}")
        if image_size % scale:
            raise ValueError(f"super_resolution needs image_size divisible by scale, got {image_size} and {scale}")
        a = bicubic_decimation_matrix(image_size, scale)
        self.scale = scale
        self.register_buffer("matrix", torch.from_numpy(a).float())
        self.register_buffer("matrix_pinv", torch.from_numpy(np.linalg.solve(a @ a.T, a).T).float())

    def A(self, x):
        """A_s X A_sᵀ: (B,3,H,W) → (B,3,H/s,W/s)."""
        m = self.matrix.to(x)
        return m @ x @ m.mT

    def At(self, y):
        """A_sᵀ Y A_s: (B,3,H/s,W/s) → (B,3,H,W)."""
        m = self.matrix.to(y)
        return m.mT @ y @ m

    def pinv(self, y):
        """P Y Pᵀ, P = A_s⁺ (the pseudo-inverse of a Kronecker product is the product of the pseudo-inverses)."""
        p = self.matrix_pinv.to(y)
        return p @ y @ p.mT

    def svd(self, like):
        """A_s = U_s S_s V_sᵀ (V_s square, n×n), so A = (U_s ⊗ U_s)(S_s ⊗ S_s)(V_s ⊗ V_s)ᵀ; x̄ is (B,3,n,n) and
        ȳ its top-left (n/s)² block. In `like`'s dtype and device."""
        u, s, vt = np.linalg.svd(self.matrix.double().cpu().numpy())
        u, v = (torch.from_numpy(m).to(like) for m in (u, vt.T))
        k = len(s)
        singulars = torch.zeros(vt.shape[0], dtype=torch.float64)
        singulars[:k] = torch.from_numpy(s)
        pad = vt.shape[0] - k
        return SVD(Vt=lambda x: v.mT @ x @ v, V=lambda xb: v @ xb @ v.mT,
                   Ut=lambda y: F.pad(u.mT @ y @ u, (0, pad, 0, pad)), U=lambda yb: u @ yb[..., :k, :k] @ u.mT,
                   singulars=torch.outer(singulars, singulars).to(like))


# --- blur --------------------------------------------------------------------------------------------------------


MAX_KERNEL = 1025  # taps; twice a 512² image, and a motion kernel draws on a canvas of twice this side


def _check_kernel_size(kernel_size):
    if not isinstance(kernel_size, int) or not 1 <= kernel_size <= MAX_KERNEL or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be an odd integer in [1, {MAX_KERNEL}], got {kernel_size!r}")


def gaussian_kernel(kernel_size: int, std: float):
    """K×K separable Gaussian, g(k) ∝ exp(−k²/(2 std²)) for k = −(K−1)/2 … (K−1)/2, normalised to sum 1."""
    _check_kernel_size(kernel_size)
    if not 1e-2 <= std <= 1e4:  # below 1e-2 the kernel is a delta to float64 precision (and std² underflows)
        raise ValueError(f"blur std must be in [0.01, 10000], got {std!r}")
    k = np.arange(kernel_size) - (kernel_size - 1) / 2
    g = np.exp(-(k**2) / (2 * std**2))
    g /= g.sum()
    return torch.from_numpy(np.outer(g, g))


def motion_kernel(kernel_size: int, intensity: float, seed: int):
    """K×K random camera-shake kernel (non-negative, sums to 1), the same for the same seed.

    A reimplementation, from its description, of the trajectory generator of LeviBorodenko/motionblur used by DPS
    (Chung et al., ICLR 2023), drawn with numpy.random.default_rng(seed): a path of Beta(1,30) steps with jittered
    headings, drawn as a line on a 2K×2K canvas, Gaussian-blurred and LANCZOS-resized to K×K. The exact values depend
    on Pillow's rasterisation and resampling.
    """
    _check_kernel_size(kernel_size)
    if not 0 <= intensity <= 1:
        raise ValueError(f"blur intensity must be in [0, 1], got {intensity!r}")
    if seed < 0:
        raise ValueError(f"blur seed must be a non-negative integer, got {seed}")
    rng = np.random.default_rng(seed)
    canvas = 2 * kernel_size
    diag = np.hypot(canvas, canvas)

    max_length = 0.75 * diag * (rng.uniform() + rng.uniform(0, intensity**2))
    steps = []
    while sum(steps) < max_length:
        steps.append(rng.beta(1, 30) * (1 - intensity + 0.1) * diag)

    max_angle = rng.uniform(0, intensity * np.pi)
    jitter = rng.beta(2, 20)
    angles = [rng.uniform(-max_angle, max_angle)]
    while len(angles) < len(steps):
        # Each heading keeps the previous heading's side, switching side with probability `jitter`.
        side = np.sign(angles[-1]) * (-1 if rng.uniform() < jitter else 1)
        angles.append(side * rng.triangular(0, intensity * max_angle, max_angle + 0.1))

    # Start the path at the origin so that a single step is still a segment, not an undrawable point.
    path = np.cumsum(np.concatenate([[0], np.array(steps) * np.exp(1j * np.array(angles))]))
    path = (path - path.mean()) * np.exp(1j * rng.uniform(0, np.pi)) + canvas * (1 + 1j) / 2

    # Greyscale canvas: the original draws white on RGB and converts to "L", which gives the same values. Pillow
    # draws nothing at width 0, which int(diag/150) gives for K < 53.
    image = Image.new("L", (canvas, canvas))
    ImageDraw.Draw(image).line([(z.real, z.imag) for z in path], fill=255, width=max(1, int(diag / 150)))
    image = image.filter(ImageFilter.GaussianBlur(radius=int(0.01 * diag)))
    kernel = np.asarray(image.resize((kernel_size, kernel_size), Image.LANCZOS), dtype=np.float64)
    return torch.from_numpy(kernel / kernel.sum())


def fft_size(n):
    """The smallest 2·3·5-smooth integer ≥ n: FFTs of such sizes are the fast ones (572 → 576)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def convolution_matrix(taps, n):
    """(n, n) float64 matrix of the 1-D zero-boundary "same" convolution with odd-length `taps`:
    T[i, m] = taps[i+c−m]."""
    c = len(taps) // 2
    lag = np.arange(n)[:, None] + c - np.arange(n)[None, :]
    return np.where((lag >= 0) & (lag < len(taps)), np.asarray(taps)[np.clip(lag, 0, len(taps) - 1)], 0.0)


class Blur(Operator):
    """y = x ⊛ k restricted to the H×W grid with x = 0 outside (zero boundary, "same" size); k is K×K, K odd.

    y[i, j] = Σ_{a,b} k[a, b] x[i + c − a, j + c − b], c = (K−1)/2. Computed as a linear (not circular) convolution by
    FFTs zero-padded to a fast size ≥ H+K−1; At is the correlation with k under the same padding and cropping, the
    exact adjoint. The kernel's spectrum is cached per size, dtype and device.

    pinv. A blur's singular values fall smoothly towards 0, so the exact A⁺ of a noisy y is mostly amplified noise.
    As in DDRM and RED-diff, singular values below `pinv_rtol` = 3e-2 of the largest count as zero. For a separable
    kernel k = a bᵀ (the Gaussian) A = T_a ⊗ T_b, and this truncated A⁺ is exact through the SVDs of the two n×n
    matrices (cached per size). A non-separable kernel (motion) has no such factorisation: 50 CG steps on A Aᵀ, then
    Aᵀ, whose early stop is the regulariser.
    """

    pinv_rtol = 3e-2

    def __init__(self, kernel):
        super().__init__()
        kernel = torch.as_tensor(kernel)
        if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise ValueError(f"blur kernel must be square with an odd side, got shape {tuple(kernel.shape)}")
        self.register_buffer("kernel", kernel.double())  # float64, so the separable factors match it exactly
        # Separable iff k = a bᵀ: the column and the row through its largest tap give a and b (O(K²), where an SVD
        # of a 1025-tap kernel takes 2 s); any split of the scale between them gives the same A = T_a ⊗ T_b.
        k = self.kernel.numpy()
        i, j = np.unravel_index(np.abs(k).argmax(), k.shape)
        a, b = k[:, j], k[i] / k[i, j]
        self._factors = (a, b) if np.abs(np.outer(a, b) - k).max() <= 1e-10 * np.abs(k[i, j]) else None
        self._spectra, self._svds = {}, {}

    def pinv(self, y):
        """Truncated A⁺y: exact for a separable kernel, else Operator.pinv's CG (see the class docstring)."""
        if self._factors is None:
            return super().pinv(y)
        ua, va, ub, vb, singulars = self._svd(y)
        inverse = torch.where(singulars > 0, 1 / singulars, torch.zeros_like(singulars))
        return va @ ((ua.T @ y @ ub) * inverse) @ vb.T

    def svd(self, like):
        """The truncated SVD that pinv uses, for images shaped like `like` (B,3,H,W): x̄ = V_aᵀ X V_b, s = s_a s_bᵀ
        with values below pinv_rtol of the largest set to 0. Separable kernels only: a motion blur has none."""
        if self._factors is None:
            raise ValueError("this blur kernel is not separable, so it has no cheap SVD (motion blur); DDRM needs one")
        ua, va, ub, vb, singulars = self._svd(like)
        return SVD(Vt=lambda x: va.T @ x @ vb, V=lambda xb: va @ xb @ vb.T, Ut=lambda y: ua.T @ y @ ub,
                   U=lambda yb: ua @ yb @ ub.T, singulars=singulars)

    def _svd(self, y):
        """U_a, V_a, U_b, V_b of T_a = U_a S_a V_aᵀ (H×H) and T_b (W×W), and s_a s_bᵀ (H, W) with the values below
        pinv_rtol of the largest set to 0, in y's dtype and device; computed once per size in float64."""
        key = (y.shape[-2], y.shape[-1], y.dtype, y.device)
        if key not in self._svds:
            (ua, sa, vat), (ub, sb, vbt) = (np.linalg.svd(convolution_matrix(f, n))
                                            for f, n in zip(self._factors, key[:2]))
            product = np.outer(sa, sb)
            kept = np.where(product >= self.pinv_rtol * product.max(), product, 0.0)
            self._svds[key] = [torch.from_numpy(m).to(y) for m in (ua, vat.T, ub, vbt.T, kept)]
        return self._svds[key]

    def _kernel_fft(self, x):
        """(FFT of k at a fast size ≥ (H+K−1, W+K−1), that size)."""
        pad = self.kernel.shape[-1] - 1
        size = (fft_size(x.shape[-2] + pad), fft_size(x.shape[-1] + pad))
        key = (size, x.dtype, x.device)
        if key not in self._spectra:
            self._spectra[key] = torch.fft.rfft2(self.kernel.to(x), s=size)
        return self._spectra[key], size

    def A(self, x):
        """(x ⊛ k)[c:c+H, c:c+W] of the full convolution: (B,3,H,W) → (B,3,H,W)."""
        kf, size = self._kernel_fft(x)
        full = torch.fft.irfft2(torch.fft.rfft2(x, s=size) * kf, s=size)
        c = self.kernel.shape[-1] // 2
        return full[..., c : c + x.shape[-2], c : c + x.shape[-1]]

    def At(self, y):
        """Correlation of the zero-embedded y with k, cropped: (B,3,H,W) → (B,3,H,W)."""
        kf, size = self._kernel_fft(y)
        c = self.kernel.shape[-1] // 2
        # Embedding y at offset c undoes A's crop; no wrap-around reaches the kept window since k vanishes there.
        full = torch.fft.irfft2(torch.fft.rfft2(F.pad(y, (c, c, c, c)), s=size) * kf.conj(), s=size)
        return full[..., : y.shape[-2], : y.shape[-1]]


# --- inpainting ----------------------------------------------------------------------------------------------------


def box_mask(image_size, size: int | float | None = None, top: int | None = None, left: int | None = None,
             margin: int | None = None, seed: int = 0):
    """n×n mask, 1 = observed, with a size×size hole (default n//2) at (top, left) if given, else placed uniformly at
    least `margin` pixels from the border by default_rng(seed) if a margin is given, else centred. `size` is in
    pixels (int) or a fraction of the image side (float ≤ 1), so one config serves every --image_size."""
    n = image_size
    if size is not None and (not 0 < size <= n or isinstance(size, float) and size > 1 and not size.is_integer()):
        raise ValueError(f"box mask: size must be a fraction in (0, 1] or pixels in [1, {n}], got {size!r}")
    size = n // 2 if size is None else round(size * n) if isinstance(size, float) and size <= 1 else int(size)
    if (top is None) != (left is None) or (top is not None and margin is not None):
        raise ValueError("box mask: give both top and left, or margin (with seed), or neither (centred)")
    if seed < 0:
        raise ValueError(f"box mask: seed must be a non-negative integer, got {seed}")
    if margin is not None:
        if margin < 0 or n - 2 * margin < size:
            raise ValueError(f"box mask: a {size}-pixel box does not fit {margin} pixels inside a {n}-pixel image")
        top, left = (int(v) for v in np.random.default_rng(seed).integers(margin, n - margin - size, 2, endpoint=True))
    elif top is None:
        top = left = (n - size) // 2
    if size < 1 or min(top, left) < 0 or max(top, left) + size > n:
        raise ValueError(f"box mask: box of size {size} at ({top}, {left}) does not fit a {n}×{n} image")
    mask = torch.ones(n, n)
    mask[top : top + size, left : left + size] = 0
    return mask


def random_mask(image_size, drop: float = 0.7, seed: int = 0):
    """n×n mask, 1 = observed, with exactly round(drop·n²) pixels dropped, chosen by default_rng(seed)."""
    if not 0 <= drop <= 1:
        raise ValueError(f"random mask: drop must be in [0, 1], got {drop!r}")
    if seed < 0:
        raise ValueError(f"random mask: seed must be a non-negative integer, got {seed}")
    n = image_size
    mask = torch.ones(n * n)
    mask[np.random.default_rng(seed).choice(n * n, round(drop * n * n), replace=False)] = 0
    return mask.view(n, n)


def file_mask(image_size, path: str):
    """n×n mask read from a greyscale image (> 127 = observed), resized with nearest neighbour."""
    try:
        with Image.open(path) as image:
            grey = image.convert("L").resize((image_size, image_size), Image.NEAREST)
    except OSError as error:
        reason = error.strerror or error
        raise ValueError(f"inpainting mask must be 'box', 'random' or a readable image file; "
                         f"{path!r}: {reason}") from None
    return torch.from_numpy(np.asarray(grey) > 127).float()


class Inpainting(Operator):
    """y = m ⊙ x with a fixed {0,1} mask m (1 = observed, shared by the channels); missing pixels read 0.

    A is an orthogonal projection, so A = Aᵀ = A⁺.
    """

    def __init__(self, mask):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.float32)
        self.register_buffer("mask", mask.view(1, 1, *mask.shape[-2:]))

    def A(self, x):
        """m ⊙ x: (B,3,H,W) → (B,3,H,W)."""
        return self.mask.to(x) * x

    At = pinv = A

    def svd(self, like):
        """Diagonal: U = V = I and s = the mask."""
        identity = lambda v: v
        return SVD(Vt=identity, V=identity, Ut=identity, U=identity, singulars=self.mask.to(like))


# --- construction by name ------------------------------------------------------------------------------------------


def _accepts(value, annotation):
    """Does a YAML value fit a parameter annotated int, float, str, None or a union of them? Floats must be finite."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts(value, option) for option in typing.get_args(annotation))
    if annotation in (None, type(None)):
        return value is None
    if isinstance(value, bool):
        return annotation is bool
    if annotation is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return annotation is inspect.Parameter.empty or isinstance(value, annotation)


def _call(fn, label, *args, **params):
    """fn(*args, **params), reporting an unknown or missing keyword, or a value of the wrong type, as a one-line
    ValueError."""
    signature = inspect.signature(fn)
    named = list(signature.parameters.values())[len(args) :]
    accepted = ", ".join(p.name for p in named if p.kind != p.VAR_KEYWORD) or "none"
    if not any(p.kind == p.VAR_KEYWORD for p in named):
        unknown = sorted(set(params) - {p.name for p in named})
        if unknown:
            raise ValueError(f"{label}: unknown parameter(s) {', '.join(unknown)}; accepted parameters: {accepted}")
    try:
        signature.bind(*args, **params)
    except TypeError as error:
        raise ValueError(f"{label}: {error}; accepted parameters: {accepted}") from None
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    for name, value in params.items():
        if name in hints and not _accepts(value, hints[name]):
            kind = getattr(hints[name], "__name__", None) or str(hints[name])  # "int | float | None"
            raise ValueError(f"{label}: '{name}' must be {'a finite ' if 'float' in kind else ''}{kind}, got {value!r}")
    return fn(*args, **params)


KERNELS = {"gaussian": gaussian_kernel, "motion": motion_kernel}
MASKS = {"box": box_mask, "random": random_mask}


def blur(image_size, kernel: str = "gaussian", **params):
    """Blur with kernel 'gaussian' (kernel_size, std) or 'motion' (kernel_size, intensity, seed); any image size."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown blur kernel {kernel!r}; choose one of: {', '.join(KERNELS)}")
    return Blur(_call(KERNELS[kernel], f"blur kernel '{kernel}'", **params))


def inpainting(image_size, mask: str = "box", **params):
    """Inpainting with mask 'box' (size, top, left | margin, seed), 'random' (drop, seed) or a mask image path."""
    if mask in MASKS:
        return Inpainting(_call(MASKS[mask], f"inpainting mask '{mask}'", image_size, **params))
    return Inpainting(_call(file_mask, f"inpainting mask file {mask!r}", image_size, mask, **params))


OPERATORS = {"super_resolution": SuperResolution, "blur": blur, "inpainting": inpainting}


def build_operator(name, image_size, **params):
    """OPERATORS[name](image_size, **params), e.g. a task config's `operator` and `params`."""
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; choose one of: {', '.join(OPERATORS)}")
    return _call(OPERATORS[name], f"operator '{name}'", image_size, **params)
