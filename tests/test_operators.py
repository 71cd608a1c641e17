from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from treg.operators import (
    Blur,
    bicubic_decimation_matrix,
    box_mask,
    build_operator,
    gaussian_kernel,
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
        ("super_resolution", {"scal": 16}, r"operator 'super_resolution': unknown parameter\(s\) scal; accepted parameters: scale$"),
        ("super_resolution", {}, r"missing.*'scale'"),
        ("blur", {"kernel": "box", "kernel_size": 5}, r"unknown blur kernel 'box'; choose one of: gaussian, motion"),
        ("blur", {"kernel": "motion", "kernel_size": 5, "std": 1.0}, r"unknown parameter\(s\) std; accepted parameters: kernel_size, intensity, seed$"),
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
