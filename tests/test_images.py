"""Image loading accepts what users have on disk: any mode, any shape, small images; and refuses what it must."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from treg.images import ImageError, check_image, load_image


def gradient(h, w):
    """An (h, w) 8-bit ramp, so a wrong scale or crop shows up in the values."""
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_every_mode_loads_as_the_same_rgb_image(mode, tmp_path):
    grey = gradient(64, 64)
    reference = torch.from_numpy(grey / 127.5 - 1).float()
    if mode == "L":
        img = Image.fromarray(grey)
    elif mode == "RGBA":  # opaque alpha: the colour must come through unchanged
        img = Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]))
    elif mode == "I;16":  # 16-bit grey uses the full 0..65535 range
        img = Image.fromarray(grey.astype(np.uint16) * 257)
    else:
        img = Image.fromarray(grey).convert("P")
    img.save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png", 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(x[0], reference.expand(3, -1, -1), atol=1.5 / 127.5)


def test_transparent_pixels_go_on_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert torch.equal(load_image(tmp_path / "clear.png", 32), torch.ones(1, 3, 32, 32))


def test_non_square_is_resized_on_the_short_side_and_centre_cropped(tmp_path):
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, 24:104] = 255  # white around the centre square (with a margin for the filter), black bands outside
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 32)
    assert x.shape == (1, 3, 32, 32) and torch.equal(x, torch.ones_like(x))


def test_small_image_is_upsampled_and_its_size_is_known(tmp_path):
    Image.fromarray(gradient(16, 24)).save(tmp_path / "small.png")
    x = load_image(tmp_path / "small.png", 64)
    size, digest = check_image(tmp_path / "small.png", 64)
    assert x.shape == (1, 3, 64, 64) and size == (24, 16)
    assert digest == hashlib.sha256((tmp_path / "small.png").read_bytes()).hexdigest()
    assert x[0, 0, 0, 0] < x[0, 0, -1, -1]  # the ramp survives the upsampling


def test_decompression_bomb_is_refused_in_one_line(tmp_path, monkeypatch):
    Image.fromarray(gradient(64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # PIL refuses images over twice the limit
    with pytest.raises(ImageError, match="refusing .*bomb.png.*decompression bomb") as err:
        load_image(tmp_path / "bomb.png", 32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["jpg", "png"])
def test_a_truncated_file_fails_the_check_though_its_header_is_intact(tmp_path, kind):
    """The check decodes the whole image (a JPEG at reduced scale): a file cut in half fails in one line."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(tmp_path / f"whole.{kind}")
    data = (tmp_path / f"whole.{kind}").read_bytes()
    (tmp_path / f"cut.{kind}").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / f"cut.{kind}") as img:
        assert img.size == (256, 256)  # the header alone passes
    assert check_image(tmp_path / f"whole.{kind}", 64)[0] == (256, 256)
    with pytest.raises(ImageError, match=f"cannot read image .*cut.{kind}: .*truncated") as err:
        check_image(tmp_path / f"cut.{kind}", 64)
    assert "\n" not in str(err.value)
