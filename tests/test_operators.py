from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw, ImageFilter

from treg.operators import (
    Blur,
    Inpainting,
    bicubic_decimation_matrix,
    box_mask,
    build_operator,
    fft_size,
    gaussian_kernel,
    keys_cubic,
    measure,
    motion_kernel,
    random_mask,
)

TASKS = sorted((Path(__file__).parents[1] / "configs" / "task").glob("*.yaml"))
SMALL = 64


def load_small(path, size=SMALL):
    """(config, operator in float64) for a task config rebuilt at a small image size; box sizes scale with it."""
    cfg = yaml.safe_load(path.read_text())
    params = dict(cfg["params"])
    for key in ("size", "top", "left", "margin"):
        if params.get("mask") == "box" and isinstance(params.get(key), int):  # fractions scale by themselves
            params[key] = params[key] * size // cfg["image_size"]
    return cfg, build_operator(cfg["operator"], size, **params).double()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dot(a, b):
    return (a * b).sum().item()


def test_all_task_configs_are_present():
    names = {p.stem for p in TASKS}
    assert {"super-resolution", "super-resolution-x8", "gauss-deblur", "motion-deblur", "inpainting",
            "inpainting-random"} <= names


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.stem)
def test_config_keys_and_full_size_build(path):
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) == {"operator", "params", "noise_scale", "image_size"}
    assert cfg["noise_scale"] > 0
    op = build_operator(cfg["operator"], cfg["image_size"], **cfg["params"])
    x = torch.zeros(1, 3, cfg["image_size"], cfg["image_size"])
    assert op.At(op.A(x)).shape == x.shape


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.stem)
def test_adjoint(path):
    _, op = load_small(path)
    x = rand(2, 3, SMALL, SMALL, seed=1)
    ax = op.A(x)
    y = rand(*ax.shape, seed=2)
    assert abs(dot(ax, y) - dot(x, op.At(y))) <= 1e-10 * ax.norm().item() * y.norm().item()


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.stem)
def test_shapes_and_dtypes(path):
    cfg, op = load_small(path)
    scale = cfg["params"].get("scale", 1)
    x = rand(1, 3, SMALL, SMALL)
    y_shape = (1, 3, SMALL // scale, SMALL // scale)
    assert op.A(x).shape == y_shape
    assert op.At(rand(*y_shape)).shape == x.shape
    assert op.pinv(rand(*y_shape)).shape == x.shape
    assert op.float().A(x).dtype == torch.float64  # methods follow the input, not the buffers
    assert op.A(x.float()).dtype == torch.float32


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.stem)
def test_pinv_reproduces_the_measurement(path):
    cfg, op = load_small(path)
    ax = op.A(rand(1, 3, SMALL, SMALL, seed=3))
    residual = (op.A(op.pinv(ax)) - ax).norm() / ax.norm()
    # Blur's pinv drops singular values below 3e-2 (Gaussian: exactly; motion: 50 CG steps on a badly conditioned
    # A Aᵀ), and white-noise x reaches them: the residual falls well below ‖y‖ (measured 0.03 Gaussian, 0.31 motion).
    assert residual < (0.5 if cfg["operator"] == "blur" else 1e-6)


@pytest.mark.parametrize("path", [p for p in TASKS if "motion" not in p.stem], ids=lambda p: p.stem)
def test_pinv_lies_in_the_row_space(path):
    _, op = load_small(path)
    p = op.pinv(rand(*op.A(rand(1, 3, SMALL, SMALL)).shape, seed=4))
    torch.testing.assert_close(op.pinv(op.A(p)), p, rtol=0, atol=1e-6 * p.abs().max().item())


def test_separable_blur_pinv_is_the_truncated_matrix_pseudo_inverse():
    n = 12
    op = build_operator("blur", n, kernel="gaussian", kernel_size=7, std=2.0).double()
    dense = op.A(torch.eye(3 * n * n, dtype=torch.float64).view(-1, 3, n, n)).reshape(3 * n * n, -1).T
    y = rand(1, 3, n, n, seed=5)
    expected = torch.from_numpy(np.linalg.pinv(dense.numpy(), rcond=Blur.pinv_rtol)) @ y.flatten()
    torch.testing.assert_close(op.pinv(y).flatten(), expected, rtol=0, atol=1e-9 * expected.abs().max().item())


def test_gaussian_blur_pinv_of_a_noisy_measurement_stays_near_the_image():
    op = build_operator("blur", SMALL, kernel="gaussian", kernel_size=61, std=5.0)
    x = torch.from_numpy(np.asarray(Image.open(Path(__file__).parents[1] / "samples/cat_1.jpg").convert("RGB")
                                    .resize((SMALL, SMALL)), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    y = op.A(x) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    p = op.pinv(y)
    assert (p - x).norm() < 0.5 * x.norm()  # the untruncated A⁺ puts ~20× ‖x‖ of amplified noise here
    assert (op.A(p) - y).norm() < 1.5 * 0.01 * y.numel() ** 0.5  # and still fits y to the noise floor


# --- super-resolution --------------------------------------------------------------------------------------------


def interpolate_reference(x, scale):
    """The official construction: symmetric-pad by 2s, antialiased bicubic resize to H/s + 4, crop 2."""
    pad = 2 * scale
    padded = torch.from_numpy(np.pad(x.numpy(), [(0, 0)] * (x.dim() - 2) + [(pad, pad)] * 2, mode="symmetric"))
    size = [x.shape[-2] // scale + 4, x.shape[-1] // scale + 4]
    out = F.interpolate(padded, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out[..., 2:-2, 2:-2]


@pytest.mark.parametrize("scale", [4, 8, 16])
def test_sr_matrix_equals_padded_interpolate(scale):
    n = 64
    matrix = bicubic_decimation_matrix(n, scale)
    # Resize only the rows of an identity image: the width keeps its size, where bicubic is the identity.
    pad = 2 * scale
    eye = np.pad(np.eye(n, dtype=np.float32), [(pad, pad), (0, 0)], mode="symmetric")
    out = F.interpolate(torch.from_numpy(eye)[None, None], size=(n // scale + 4, n), mode="bicubic",
                        antialias=True, align_corners=False)[0, 0, 2:-2]
    np.testing.assert_allclose(matrix, out.numpy(), atol=1e-5)
    np.testing.assert_allclose(matrix.sum(axis=1), 1, atol=1e-12)


@pytest.mark.parametrize("scale,n", [(4, 64), (8, 64), (16, 64), (16, 512)])
def test_sr_operator_equals_padded_interpolate(scale, n):
    x = torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(0)) * 2 - 1
    op = build_operator("super_resolution", n, scale=scale)
    torch.testing.assert_close(op.A(x), interpolate_reference(x, scale), rtol=0, atol=1e-5)


def test_sr_pinv_is_the_matrix_pseudo_inverse():
    op = build_operator("super_resolution", 64, scale=8)
    expected = torch.linalg.pinv(op.matrix.double())
    torch.testing.assert_close(op.matrix_pinv.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("scale,size", [(3, 64), (2, 64), (16, 72)])
def test_sr_rejects_bad_scale_or_size(scale, size):
    with pytest.raises(ValueError, match="super_resolution"):
        build_operator("super_resolution", size, scale=scale)


# --- blur --------------------------------------------------------------------------------------------------------


def test_gaussian_kernel_matches_scipy_window():
    g = scipy.signal.windows.gaussian(61, 5.0)
    expected = np.outer(g, g) / np.outer(g, g).sum()
    kernel = gaussian_kernel(61, 5.0).numpy()
    np.testing.assert_allclose(kernel, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-15)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-15)
    assert kernel.sum() == pytest.approx(1, abs=1e-12)
    assert kernel.argmax() == 30 * 61 + 30


def test_gaussian_kernel_rejects_even_size():
    with pytest.raises(ValueError, match="odd"):
        build_operator("blur", 64, kernel="gaussian", kernel_size=60, std=5.0)


@pytest.mark.parametrize("kernel", [motion_kernel(9, 0.5, 3), gaussian_kernel(7, 1.5)], ids=["motion", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blur_equals_zero_padded_conv2d(kernel, dtype):
    # Non-square image and an asymmetric (motion) kernel, so a swapped axis or a kernel flip would show.
    x = torch.randn(2, 3, 16, 21, dtype=dtype, generator=torch.Generator().manual_seed(0))
    op = Blur(kernel).to(dtype)
    k = op.kernel  # the float32 buffer, so float64 compares the same numbers
    weight = k.flip(-2, -1).expand(3, 1, *k.shape)  # conv2d correlates; convolution correlates with the flip
    expected = F.conv2d(x, weight, padding=k.shape[-1] // 2, groups=3)
    out = op.A(x)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)
    # The adjoint is the correlation with k: conv_transpose2d of the same convolution.
    y = torch.randn_like(x)
    torch.testing.assert_close(op.At(y),
                               F.conv_transpose2d(y, weight, padding=k.shape[-1] // 2, groups=3), rtol=0, atol=tol)


def test_motion_kernel_is_deterministic_per_seed():
    a, b, c = motion_kernel(61, 0.5, 0), motion_kernel(61, 0.5, 0), motion_kernel(61, 0.5, 1)
    assert a.shape == (61, 61)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    for k in (a, c):
        assert (k >= 0).all()
        assert k.sum().item() == pytest.approx(1, abs=1e-12)
    ops = [build_operator("blur", 64, kernel="motion", kernel_size=61, intensity=0.5, seed=0) for _ in range(2)]
    assert torch.equal(ops[0].kernel, ops[1].kernel)


def test_motion_kernel_is_valid_for_many_seeds():
    # Includes seeds whose path has a single step, which must still draw a segment.
    for seed in range(200):
        k = motion_kernel(15, 0.5, seed)
        assert torch.isfinite(k).all() and k.sum().item() == pytest.approx(1, abs=1e-12)


# --- inpainting ----------------------------------------------------------------------------------------------------


def test_box_mask_placement():
    centred = box_mask(64, size=32)
    assert centred[16:48, 16:48].sum() == 0 and centred.sum() == 64 * 64 - 32 * 32
    assert box_mask(64).sum() == 64 * 64 - 32 * 32  # default size n//2
    explicit = box_mask(64, size=10, top=3, left=50)
    assert explicit[3:13, 50:60].sum() == 0 and explicit.sum() == 64 * 64 - 100
    drawn = [box_mask(64, size=16, margin=8, seed=s) for s in range(5)]
    assert torch.equal(drawn[0], box_mask(64, size=16, margin=8, seed=0))
    assert len({tuple(m.flatten().tolist()) for m in drawn}) > 1
    for m in drawn:
        rows, cols = torch.nonzero(m == 0, as_tuple=True)
        assert rows.min() >= 8 and rows.max() < 56 and cols.min() >= 8 and cols.max() < 56
        assert (m == 0).sum() == 256


@pytest.mark.parametrize("params", [dict(size=40, margin=16), dict(size=10, top=60, left=0), dict(top=3),
                                    dict(size=10, top=3, left=3, margin=2)])
def test_box_mask_rejects_bad_placement(params):
    with pytest.raises(ValueError, match="box mask"):
        build_operator("inpainting", 64, mask="box", **params)


def test_random_mask_drops_the_requested_fraction():
    m = random_mask(64, drop=0.7, seed=0)
    assert (m == 0).sum() == round(0.7 * 64 * 64)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m, random_mask(64, drop=0.7, seed=0))
    assert not torch.equal(m, random_mask(64, drop=0.7, seed=1))
    op = build_operator("inpainting", 64, mask="random", drop=0.7, seed=0)
    y = op.A(torch.ones(1, 3, 64, 64))
    assert torch.equal(y[0, 0], y[0, 1]) and torch.equal(y[0, 0], y[0, 2])  # same mask in every channel


def test_mask_from_png(tmp_path):
    grey = np.zeros((32, 32), dtype=np.uint8)
    grey[:, :16] = 200  # left half observed
    grey[0, 31] = 100  # ≤ 127: missing
    Image.fromarray(grey).save(tmp_path / "mask.png")
    op = build_operator("inpainting", 64, mask=str(tmp_path / "mask.png"))
    assert op.mask.shape == (1, 1, 64, 64)
    assert (op.mask[..., :, :32] == 1).all() and (op.mask[..., :, 32:] == 0).all()


def test_mask_file_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        build_operator("inpainting", 64, mask=str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="bad.png"):
        build_operator("inpainting", 64, mask=str(tmp_path / "bad.png"))


# --- construction errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params,pattern",
    [
        ("deblur", {}, r"unknown operator 'deblur'; choose one of: super_resolution, blur, inpainting"),
        ("super_resolution", {"scal": 16},
         r"operator 'super_resolution': unknown parameter\(s\) scal; accepted parameters: scale$"),
        ("super_resolution", {}, r"missing.*'scale'"),
        ("blur", {"kernel": "box", "kernel_size": 5}, r"unknown blur kernel 'box'; choose one of: gaussian, motion"),
        ("blur", {"kernel": "motion", "kernel_size": 5, "std": 1.0},
         r"unknown parameter\(s\) std; accepted parameters: kernel_size, intensity, seed$"),
        ("blur", {"kernel": "gaussian", "kernel_size": 5}, r"missing.*'std'"),
        ("inpainting", {"mask": "random", "size": 3}, r"unknown parameter\(s\) size; accepted parameters: drop, seed$"),
    ],
)
def test_bad_names_and_parameters_raise_readable_errors(name, params, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        build_operator(name, 64, **params)
    assert "\n" not in str(info.value)


def test_box_size_as_a_fraction_of_the_image():
    full = build_operator("inpainting", 512, mask="box", size=0.5).mask
    small = build_operator("inpainting", 64, mask="box", size=0.5).mask
    assert (full == 0).sum() == 256 * 256 and (small == 0).sum() == 32 * 32
    assert torch.equal(full, build_operator("inpainting", 512, mask="box", size=256).mask)


# --- mutation-testing follow-ups (issue 16): closed forms, replays and the argument-check contract ---------------


def replay_motion_kernel(size, intensity, seed):
    """Motion kernel written step by step from the reference's description of LeviBorodenko's `Kernel` (§1.1 of
    shared/reference/operators-and-metrics.md), with the same default_rng(seed) draws in the same order."""
    rng = np.random.default_rng(seed)
    diag = np.hypot(2 * size, 2 * size)  # 1. canvas twice the kernel size
    max_len = 0.75 * diag * (rng.uniform(0, 1) + rng.uniform(0, intensity**2))  # 2.
    lengths = []
    while sum(lengths) < max_len:  # 3. Beta(1, 30)·(1 − I + 0.1)·diag until the sum reaches the maximum
        lengths.append(rng.beta(1, 30) * (1 - intensity + 0.1) * diag)
    max_angle, jitter = rng.uniform(0, intensity * np.pi), rng.beta(2, 20)  # 4.
    theta = [rng.uniform(-max_angle, max_angle)]
    for _ in lengths[1:]:  # the next heading keeps the previous side unless it flips (probability JITTER)
        flip = rng.uniform(0, 1) < jitter
        theta.append(np.sign(theta[-1]) * (-1.0 if flip else 1.0) * rng.triangular(0, intensity * max_angle,
                                                                                    max_angle + 0.1))
    points = [0j]  # 5. cumulative sum of step·e^{iθ} from the origin, centred, rotated by U(0, π), moved to the centre
    for r, t in zip(lengths, theta):
        points.append(points[-1] + r * complex(np.cos(t), np.sin(t)))
    points = np.array(points)
    rotation = rng.uniform(0, np.pi)
    points = (points - points.mean()) * complex(np.cos(rotation), np.sin(rotation)) + complex(size, size)
    canvas = Image.new("L", (2 * size, 2 * size))  # 6. line of width int(diag/150) (at least 1 px), blur, LANCZOS
    ImageDraw.Draw(canvas).line([(p.real, p.imag) for p in points], fill=255, width=max(1, int(diag / 150)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=int(0.01 * diag))).resize((size, size), Image.LANCZOS)
    kernel = np.asarray(canvas, dtype=np.float64)
    return kernel / kernel.sum()


@pytest.mark.parametrize("size,intensity,seeds", [(15, 0.5, range(8)), (61, 0.5, range(3)), (61, 1.0, [3]),
                                                  (61, 0.0, [1]), (213, 0.3, [0])])
def test_motion_kernel_replays_the_described_generator(size, intensity, seeds):
    """motion_kernel equals the per-step replay of the reference algorithm to rounding (1e-12), for line widths 1
    (K = 15, 61) and 4 (K = 213, where diag/150 = 4.02 but diag/151 < 4), blur radii 0 and ≥ 1, and I = 0, 0.5, 1."""
    for seed in seeds:
        np.testing.assert_allclose(motion_kernel(size, intensity, seed).numpy(),
                                   replay_motion_kernel(size, intensity, seed), rtol=0, atol=1e-12)


@pytest.mark.parametrize("params,pattern", [(dict(intensity=1.5, seed=0), r"^blur intensity must be in \[0, 1\]"),
                                            (dict(intensity=-0.1, seed=0), r"^blur intensity must be in \[0, 1\]"),
                                            (dict(intensity=0.5, seed=-1), r"^blur seed must be a non-negative")])
def test_motion_kernel_rejects_out_of_range_arguments(params, pattern):
    """Intensity outside [0, 1] and negative seeds raise the documented one-line message (ends 0 and 1 are valid:
    see the replay test)."""
    with pytest.raises(ValueError, match=pattern):
        motion_kernel(15, **params)


def test_keys_cubic_is_an_interpolating_partition_of_unity():
    """Keys' kernel: k(0) = 1, k(±1) = k(±2) = 0, k = 0 for |t| ≥ 2, and Σ_m k(t − m) = 1, Σ_m m k(t − m) = t
    (it reproduces constants and lines) for t on a grid; the sums run over m = −6..6, so a nonzero tail would show."""
    t = np.linspace(-1, 1, 41)
    m = np.arange(-6, 7)[:, None]
    weights = keys_cubic(t[None, :] - m).astype(np.float64)
    np.testing.assert_allclose(weights.sum(axis=0), 1, atol=1e-14)
    np.testing.assert_allclose((m * weights).sum(axis=0), t, atol=1e-14)
    np.testing.assert_array_equal(keys_cubic(np.array([0.0, 1.0, -1.0, 2.0, -2.0, 2.5, 3.0, 7.0])),
                                  [1, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("n,scale", [(4, 4), (8, 4), (16, 16)])
def test_sr_matrix_folds_taps_back_repeatedly_on_tiny_images(n, scale):
    """When the 4s taps reach past a whole image (n ≤ 2s), numpy's 'symmetric' padding reflects repeatedly; the
    matrix still equals symmetric-pad → antialiased bicubic → crop (the construction of test_sr_matrix_...)."""
    pad = 2 * scale
    eye = np.pad(np.eye(n, dtype=np.float64), [(pad, pad), (0, 0)], mode="symmetric")
    out = F.interpolate(torch.from_numpy(eye)[None, None], size=(n // scale + 4, n), mode="bicubic",
                        antialias=True, align_corners=False)[0, 0, 2:-2]
    np.testing.assert_allclose(bicubic_decimation_matrix(n, scale), out.numpy(), atol=1e-6)


def test_sr_methods_follow_the_input_dtype_and_keep_the_scale():
    """A float32-buffer SR operator applied to float64 inputs: A, At and pinv return float64 and equal the dense
    float64 products A_s X A_sᵀ, A_sᵀ Y A_s and P Y Pᵀ with P = pinv(A_s); `scale` is kept (latent_ops reads it)."""
    op = build_operator("super_resolution", 32, scale=8)
    assert op.scale == 8
    m = op.matrix.double()
    p = torch.linalg.pinv(m)
    x, y = rand(1, 3, 32, 32, seed=6), rand(1, 3, 4, 4, seed=7)
    for out, expected in ((op.A(x), m @ x @ m.T), (op.At(y), m.T @ y @ m), (op.pinv(y), p @ y @ p.T)):
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def smooth_numbers(limit):
    """All 2^a 3^b 5^c ≤ limit, by enumeration."""
    return sorted(2**a * 3**b * 5**c for a in range(12) for b in range(8) for c in range(6)
                  if 2**a * 3**b * 5**c <= limit)


def test_fft_size_is_the_next_2_3_5_smooth_integer():
    """fft_size(n) = min{m ≥ n : m = 2^a 3^b 5^c} for n = 1..300, against an enumeration of those numbers."""
    smooth = np.array(smooth_numbers(400))
    for n in range(1, 301):
        assert fft_size(n) == smooth[np.searchsorted(smooth, n)], n


@pytest.mark.parametrize("size", [0, -1, 2, 60, 1027, 5.0, "5"])
def test_kernel_size_check_rejects_even_out_of_range_or_non_integer_sizes(size):
    """_check_kernel_size's one-line message (a user-facing contract) for even, out-of-range and non-int sizes."""
    with pytest.raises(ValueError, match=r"^blur kernel_size must be an odd integer in \[1, 1025\]"):
        gaussian_kernel(size, 1.0)


def test_gaussian_kernel_accepts_the_ends_of_its_ranges():
    """K = 1 is the 1×1 delta and K = 1025 is allowed; std = 0.01, 0.5 and 1e4 are accepted (ends inclusive): at
    std = 1e4 over 1025 taps the kernel is flat to 1 − exp(−512²/(2·1e8)) = 1.3e-3; std outside raises."""
    assert gaussian_kernel(1, 1.0).tolist() == [[1.0]]
    assert gaussian_kernel(1025, 50.0).shape == (1025, 1025)
    assert gaussian_kernel(3, 0.01)[1, 1] == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(gaussian_kernel(3, 0.5).numpy().sum(axis=0), scipy.signal.windows.gaussian(3, 0.5)
                               / scipy.signal.windows.gaussian(3, 0.5).sum(), rtol=1e-12)
    flat = gaussian_kernel(1025, 1e4)
    assert (flat.max() / flat.min()).item() == pytest.approx(np.exp(512**2 / 1e8), rel=1e-9)
    for std in (0.0099, 10000.5):
        with pytest.raises(ValueError, match=r"^blur std must be in \[0.01, 10000\]"):
            gaussian_kernel(3, std)


@pytest.mark.parametrize("kernel", [torch.ones(4, 4), torch.ones(3, 5), torch.ones(3, 3, 3), torch.ones(3)])
def test_blur_rejects_non_square_even_or_non_2d_kernels(kernel):
    """Blur's one-line message names the rule and the shape it got."""
    with pytest.raises(ValueError, match=r"^blur kernel must be square with an odd side, got shape \(" +
                       ", ".join(map(str, kernel.shape))):
        Blur(kernel)


def test_separability_tolerance_is_relative_and_inclusive():
    """k = a bᵀ is recognised at any scale (the tolerance is 1e-10·max|k|): a Gaussian kernel ×1e6 has an SVD; a
    1e-6 relative off-rank perturbation has none; an entry exactly 1e-10·max off the rank-1 fit still counts."""
    g = gaussian_kernel(7, 1.5)
    Blur(g * 1e6).svd(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="not separable"):
        Blur(g + 1e-6 * g.max() * torch.eye(7).flip(0)).svd(torch.zeros(1, 3, 8, 8))
    k = torch.zeros(3, 3, dtype=torch.float64)
    k[1, 1], k[0, 0] = 1.0, 1e-10  # the rank-1 fit through the largest tap is e₁e₁ᵀ: residual 1e-10 exactly
    assert Blur(k)._factors is not None


def test_separable_blur_pinv_on_a_non_square_image_is_the_truncated_pseudo_inverse():
    """H ≠ W (7 × 10): the cached SVD of T_a ⊗ T_b has the right side per axis; pinv equals the dense truncated
    pseudo-inverse (numpy pinv with rcond = pinv_rtol) of A built column by column."""
    h, w = 7, 10
    op = Blur(np.outer(gaussian_kernel(5, 1.0)[2], np.array([0.1, 0.2, 0.4, 0.2, 0.1])))
    dense = op.A(torch.eye(h * w, dtype=torch.float64).view(-1, 1, h, w)).reshape(h * w, -1).T
    y = rand(1, 3, h, w, seed=8)
    expected = (torch.from_numpy(np.linalg.pinv(dense.numpy(), rcond=Blur.pinv_rtol)) @ y.reshape(3, -1).T).T
    torch.testing.assert_close(op.pinv(y).reshape(3, -1), expected, rtol=0, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("n", [17, 9, 31])
def test_one_tap_blur_is_the_identity_in_the_input_dtype(n):
    """K = 1, k = [[1]]: A = At = I exactly (n − 1 is a fast FFT size here, so a one-short padding would crop); a
    fresh Blur (float64 kernel) on float32 input answers in float32."""
    op = Blur(torch.ones(1, 1))
    x = rand(1, 3, n, n, seed=9)
    torch.testing.assert_close(op.A(x), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.At(x), x, rtol=0, atol=1e-12)
    assert op.A(x.float()).dtype == torch.float32 and op.At(x.float()).dtype == torch.float32


def test_blur_svd_of_a_motion_kernel_raises_the_documented_message():
    with pytest.raises(ValueError, match=r"^this blur kernel is not separable, so it has no cheap SVD"):
        Blur(motion_kernel(9, 0.5, 0)).svd(torch.zeros(1, 3, 8, 8))


def test_box_mask_edge_cases_of_size_and_placement():
    """Pixel counts and placement at the ends of the allowed ranges: size = n, 1 px (int) and 1.0 (fraction = whole
    image), 2.0 (a whole-number float counts as pixels), boxes touching each border, margin 0, and the tightest
    margin (n − 2·margin = size, where the only placement is top = left = margin)."""
    n = 16
    assert box_mask(n, size=n).sum() == 0
    assert box_mask(n, size=1.0).sum() == 0
    one = box_mask(n, size=1, top=0, left=0)
    assert one.sum() == n * n - 1 and one[0, 0] == 0
    assert box_mask(n, size=2.0, top=0, left=0).sum() == n * n - 4
    corner = box_mask(n, size=4, top=n - 4, left=n - 4)
    assert corner[n - 4 :, n - 4 :].sum() == 0 and corner.sum() == n * n - 16
    assert (box_mask(n, size=4, margin=0, seed=3) == 0).sum() == 16
    tight = box_mask(n, size=8, margin=4, seed=5)
    assert tight[4:12, 4:12].sum() == 0 and tight.sum() == n * n - 64
    assert torch.equal(box_mask(64, size=16, margin=8), box_mask(64, size=16, margin=8, seed=0))  # default seed 0


def test_box_mask_margin_placement_covers_the_inclusive_range():
    """With n = 16, size 4, margin 5 the top-left corner is uniform on {5, 6, 7} per axis (endpoint included):
    over 300 seeds each of the 3 values appears (P(a value never appears) ≤ 2·(2/3)^300 < 1e-50)."""
    tops = set()
    for seed in range(300):
        rows, cols = torch.nonzero(box_mask(16, size=4, margin=5, seed=seed) == 0, as_tuple=True)
        tops.update((rows.min().item(), cols.min().item()))
    assert tops == {5, 6, 7}


@pytest.mark.parametrize("params,pattern", [
    (dict(size=0), r"^box mask: size must be a fraction in \(0, 1\] or pixels in \[1, 16\], got 0"),
    (dict(size=17), r"^box mask: size must be a fraction"),
    (dict(size=1.5), r"^box mask: size must be a fraction"),
    (dict(top=3), r"^box mask: give both top and left, or margin"),
    (dict(seed=-1, margin=1), r"^box mask: seed must be a non-negative integer, got -1"),
    (dict(size=4, margin=-1), r"^box mask: a 4-pixel box does not fit -1 pixels"),
    (dict(size=8, top=-1, left=0), r"^box mask: box of size 8 at \(-1, 0\) does not fit a 16×16 image"),
    (dict(size=8, top=0, left=9), r"^box mask: box of size 8 at \(0, 9\) does not fit"),
])
def test_box_mask_messages(params, pattern):
    """box_mask's one-line messages name the rule broken (size, placement, seed, fit)."""
    with pytest.raises(ValueError, match=pattern):
        box_mask(16, **params)


def test_random_mask_defaults_ends_and_messages():
    """Default drop 0.7 and seed 0; drop = 0 and 1 are allowed (no / every pixel dropped); out-of-range drop or a
    negative seed raise the one-line message."""
    assert torch.equal(random_mask(16), random_mask(16, drop=0.7, seed=0))
    assert (random_mask(16) == 0).sum() == round(0.7 * 256)
    assert random_mask(16, drop=0.0).sum() == 256 and random_mask(16, drop=1.0).sum() == 0
    with pytest.raises(ValueError, match=r"^random mask: drop must be in \[0, 1\], got 1.5"):
        random_mask(16, drop=1.5)
    with pytest.raises(ValueError, match=r"^random mask: seed must be a non-negative integer, got -2"):
        random_mask(16, seed=-2)


def test_mask_file_is_thresholded_after_nearest_resizing(tmp_path):
    """A 5×5 greyscale file with values 0..255 (including 127 and 128) read at 16 px equals the nearest-neighbour
    map src = ⌊(i + ½)·5/16⌋ followed by > 127; an RGB file is read through the luma
    L = (299R + 587G + 114B)/1000."""
    grey = np.random.default_rng(0).integers(0, 256, (5, 5)).astype(np.uint8)
    grey[0, 0], grey[0, 1] = 127, 128
    Image.fromarray(grey).save(tmp_path / "grey.png")
    src = np.floor((np.arange(16) + 0.5) * 5 / 16).astype(int)
    expected = torch.from_numpy((grey[src][:, src] > 127).astype(np.float32))
    assert torch.equal(build_operator("inpainting", 16, mask=str(tmp_path / "grey.png")).mask[0, 0], expected)
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, :, 0] = 255  # red: L = 76, missing
    rgb[1, :, 1] = 255  # green: L = 150, observed
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    mask = build_operator("inpainting", 4, mask=str(tmp_path / "rgb.png")).mask
    assert mask.shape == (1, 1, 4, 4) and mask[0, 0, :2].sum() == 0 and (mask[0, 0, 2:] == 1).all()


def test_mask_file_errors_give_the_reason(tmp_path):
    """The unreadable-file message ends with the OS reason or Pillow's, not a bare repr or None."""
    with pytest.raises(ValueError, match=r"^inpainting mask must be 'box', 'random' or a readable image file; .*"
                                         r"missing.png': No such file or directory$"):
        build_operator("inpainting", 64, mask=str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"bad.png': cannot identify image file"):
        build_operator("inpainting", 64, mask=str(tmp_path / "bad.png"))


def test_inpainting_follows_the_input_dtype_and_leading_mask_dims():
    """A (1, n, n) mask gives the same operator as (n, n); A on bfloat16 input stays bfloat16 and equals m ⊙ x; the
    SVD's singulars (the mask) come in `like`'s dtype."""
    m = random_mask(8, drop=0.5, seed=1)
    x = rand(2, 3, 8, 8, seed=10)
    op = build_operator("inpainting", 8, mask="random", drop=0.5, seed=1)
    torch.testing.assert_close(Inpainting(m[None]).A(x), m * x, rtol=0, atol=0)
    out = op.A(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, (m * x).bfloat16())
    assert op.svd(x).singulars.dtype == torch.float64


def test_measure_adds_scaled_noise_from_the_generator():
    """measure(op, x, σ, g) = A x + σ·n, n the generator's next torch.randn draw (replayed from the same seed)."""
    op = build_operator("inpainting", 8, mask="random", drop=0.5, seed=1).double()
    x = rand(2, 3, 8, 8, seed=11)
    y = measure(op, x, 0.3, torch.Generator().manual_seed(4))
    n = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(y, op.A(x) + 0.3 * n, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,params,message", [
    ("blur", dict(kernel_size=5.0, std=1.0), "blur kernel 'gaussian': 'kernel_size' must be int, got 5.0"),
    ("blur", dict(kernel="gaussian", kernel_size=True, std=1.0),
     "blur kernel 'gaussian': 'kernel_size' must be int, got True"),
    ("blur", dict(kernel="gaussian", kernel_size="5", std=1.0),
     "blur kernel 'gaussian': 'kernel_size' must be int, got '5'"),
    ("blur", dict(kernel="gaussian", kernel_size=5, std="1"), "blur kernel 'gaussian': 'std' must be a finite float, "
                                                              "got '1'"),
    ("blur", dict(kernel="gaussian", kernel_size=5, std=float("inf")), "blur kernel 'gaussian': 'std' must be a finite "
                                                                         "float, got inf"),
    ("blur", dict(kernel="motion", kernel_size=5, intensity=0.5, seed=0.5), "blur kernel 'motion': 'seed' must be int, "
                                                                                    "got 0.5"),
    ("super_resolution", dict(scale=16.0), "operator 'super_resolution': 'scale' must be int, got 16.0"),
    ("inpainting", dict(size=float("inf")),
     "inpainting mask 'box': 'size' must be a finite int | float | None, got inf"),
    ("inpainting", dict(size="8"), "inpainting mask 'box': 'size' must be a finite int | float | None, got '8'"),
    ("inpainting", dict(mask="random", drop=True), "inpainting mask 'random': 'drop' must be a finite float, got True"),
])
def test_wrong_types_raise_the_one_line_contract_message(name, params, message):
    """_call's type check (a user-facing contract: config typos must read as one line naming label, parameter,
    expected type and value). Bools are not ints, ints are floats, unions accept any member, floats must be finite."""
    with pytest.raises(ValueError) as info:
        build_operator(name, 64, **params)
    assert str(info.value) == message


def test_parameters_accepted_by_their_annotations():
    """What _accepts lets through: None and int pixels and float fractions for box `size`, an int for a float
    (`std=2`), and the defaults (kernel 'gaussian', mask 'box' centred n/2)."""
    assert torch.equal(build_operator("inpainting", 16, mask="box", size=None).mask[0, 0], box_mask(16))
    assert torch.equal(build_operator("inpainting", 16).mask[0, 0], box_mask(16))
    assert torch.equal(build_operator("blur", 16, kernel_size=5, std=2).kernel, gaussian_kernel(5, 2.0))


def test_unknown_parameter_messages_list_all_and_say_none(tmp_path):
    """Two unknown keys are listed comma-separated; a mask file takes no parameters, so the list reads 'none'."""
    with pytest.raises(ValueError) as info:
        build_operator("blur", 64, kernel="gaussian", kernel_size=5, std=1.0, b=1, a=2)
    assert str(info.value) == "blur kernel 'gaussian': unknown parameter(s) a, b; accepted parameters: kernel_size, std"
    with pytest.raises(ValueError) as info:
        build_operator("inpainting", 64, mask=str(tmp_path / "m.png"), seed=1)
    assert str(info.value) == (f"inpainting mask file {str(tmp_path / 'm.png')!r}: unknown parameter(s) seed; "
                               "accepted parameters: none")
