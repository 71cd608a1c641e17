"""FID and KID: closed forms on Gaussians with known statistics, folders -> features -> score with an injected
extractor, and the one-line degradation when pytorch-fid or its weights are missing."""
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from treg import fid
from treg.commands import fid as fid_command
from treg.metrics import MetricUnavailable


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)  # standard deviations
    closed = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_matches_sqrtm_for_full_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=6), rng.normal(size=6), random_spd(rng, 6), random_spd(rng, 6)
    # pytorch-fid's formula: tr S1 + tr S2 - 2 tr sqrtm(S1 S2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_is_zero_for_identical_singular_statistics():
    rng = np.random.default_rng(2)
    s = random_spd(rng, 40, rank=10)  # fewer images than dimensions, as 250 images in 2048 dims
    # eigenvalues that are 0 in exact arithmetic come out at ±1e-16, whose square roots add up to ~1e-7
    assert abs(fid.frechet_distance(np.ones(40), s, np.ones(40), s)) < 1e-6 * np.trace(s)
    assert fid.frechet_distance(np.ones(40), s, np.zeros(40), s) == pytest.approx(40, abs=1e-6 * np.trace(s))


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(3)
    mu1, mu2, s1, s2 = np.zeros(3), np.array([1.0, 0, -1]), np.diag([1.0, 2, 0.5]), np.diag([0.5, 2, 1])
    f1, f2 = rng.multivariate_normal(mu1, s1, 200_000), rng.multivariate_normal(mu2, s2, 200_000)
    closed = 2 + (1 - 0.5 ** 0.5) ** 2 * 2
    assert fid.frechet_distance(*fid.statistics(f1), *fid.statistics(f2)) == pytest.approx(closed, abs=0.02)


def test_statistics_are_the_mean_and_the_unbiased_covariance_by_outer_products():
    """pytorch-fid's np.cov: Σ = Σ_n (f_n − f̄)(f_n − f̄)ᵀ / (N − 1), D × D for N ≠ D features. At N = 5 the
    biased 1/N estimator is 20% smaller, and a covariance over images instead of features has the wrong shape."""
    rng = np.random.default_rng(7)
    f = rng.normal(size=(5, 3)) @ rng.normal(size=(3, 3)) + np.array([1.0, -2.0, 0.5])  # correlated features
    mean = sum(f) / 5
    outer = sum(np.outer(row - mean, row - mean) for row in f) / 4
    mu, sigma = fid.statistics(f.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(mu, mean, rtol=1e-6)
    np.testing.assert_allclose(sigma, outer, rtol=1e-5, atol=1e-6)


def test_fid_of_few_one_dimensional_features_is_the_unbiased_closed_form():
    """For 1-d features FID = (m₁ − m₂)² + (s₁ − s₂)² with s the unbiased standard deviation (N − 1 divisor)."""
    a, b = np.array([[0.0], [1.0], [3.0]]), np.array([[2.0], [2.5], [6.0], [7.5]])
    sd = lambda x: (((x - x.mean()) ** 2).sum() / (len(x) - 1)) ** 0.5
    closed = (a.mean() - b.mean()) ** 2 + (sd(a) - sd(b)) ** 2
    assert fid.frechet_distance(*fid.statistics(a), *fid.statistics(b)) == pytest.approx(closed, rel=1e-12)


def test_frechet_distance_of_float32_statistics_is_computed_in_float64():
    """Statistics handed over in float32 are widened first: the result equals the float64 computation on the same
    (float32-representable) values to float64 precision, where float32 eigendecompositions err by ~1e-6."""
    rng = np.random.default_rng(8)
    mu1, mu2 = rng.normal(size=30).astype(np.float32), rng.normal(size=30).astype(np.float32)
    s1, s2 = random_spd(rng, 30).astype(np.float32), random_spd(rng, 30).astype(np.float32)
    wide = fid.frechet_distance(mu1.astype(np.float64), s1.astype(np.float64), mu2.astype(np.float64),
                                s2.astype(np.float64))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(wide, rel=1e-12)


def recording_mmd(monkeypatch):
    """Replace mmd2_unbiased by a recorder of the subset shapes it is called with (returning 0)."""
    calls = []
    monkeypatch.setattr(fid, "mmd2_unbiased", lambda x, y: calls.append((x.shape, y.shape)) or 0.0)
    return calls


def test_kid_subsets_are_clean_fids_100_of_min_n_and_1000_without_replacement(monkeypatch):
    rng = np.random.default_rng(9)
    big, small = rng.normal(size=(1001, 2)), rng.normal(size=(7, 2))
    calls = recording_mmd(monkeypatch)
    fid.kid(big, big + 1)
    assert calls == [((1000, 2), (1000, 2))] * 100  # clean-fid's num_subsets=100, max_subset_size=1000
    for x, y in ((big, small), (small, big)):  # the smaller set decides the subset size
        calls.clear()
        fid.kid(x, y, subsets=3)
        assert calls == [((7, 2), (7, 2))] * 3
    monkeypatch.undo()
    # all of a set below 1000 images is drawn, in some order: KID is the whole-set unbiased MMD² (draws are
    # without replacement, else repeated images would bias the within-set sums)
    x, y = small, rng.normal(size=(7, 2)) + 0.3
    assert fid.kid(x, y, subsets=4) == pytest.approx(fid.mmd2_unbiased(x, y), rel=1e-12)
    # float32 features are widened first: the same KID as their float64 copies to float64 precision
    x32, y32 = (rng.normal(size=(30, 50)) + 0.2).astype(np.float32), rng.normal(size=(30, 50)).astype(np.float32)
    assert fid.kid(x32, y32, subsets=2) == pytest.approx(fid.kid(x32.astype(np.float64), y32.astype(np.float64),
                                                                 subsets=2), rel=1e-12)
    # a fixed seed: the same features give the same KID when the subsets are proper
    x, y = rng.normal(size=(1200, 2)), rng.normal(size=(1200, 2))
    assert fid.kid(x, y, subsets=2) == fid.kid(x, y, subsets=2)


def test_kid_needs_two_images_and_takes_exactly_two():
    x, y = np.array([[0.0, 1.0], [2.0, -1.0]]), np.array([[1.0, 1.0], [0.5, 3.0]])
    k = lambda a, b: (a @ b / 2 + 1) ** 3
    pairwise = k(x[0], x[1]) + k(y[0], y[1]) - sum(k(a, b) for a in x for b in y) / 2  # within: 2 ordered pairs / 2
    assert fid.kid(x, y, subsets=3) == pytest.approx(pairwise, rel=1e-12)
    with pytest.raises(ValueError, match="^KID needs at least 2 images in each set$"):
        fid.kid(x[:1], y)


def expected_cubic_kernel(m1, s1, m2, s2):
    """E[(xᵀy/d + 1)³] for independent x ~ N(m1, diag s1²), y ~ N(m2, diag s2²), from the cumulants of the sum
    u = Σ_i x_i y_i / d of independent terms."""
    d = len(m1)
    raw = lambda m, s: (m, m ** 2 + s ** 2, m ** 3 + 3 * m * s ** 2)  # Gaussian raw moments 1..3
    (a1, a2, a3), (b1, b2, b3) = raw(m1, s1), raw(m2, s2)
    w1, w2, w3 = a1 * b1 / d, a2 * b2 / d ** 2, a3 * b3 / d ** 3
    k1, k2, k3 = w1.sum(), (w2 - w1 ** 2).sum(), (w3 - 3 * w2 * w1 + 2 * w1 ** 3).sum()
    return 1 + 3 * k1 + 3 * (k2 + k1 ** 2) + (k3 + 3 * k2 * k1 + k1 ** 3)


@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_kid_is_unbiased_for_the_population_mmd(shift):
    d = 4
    m1, s1 = np.zeros(d), np.ones(d)
    m2, s2 = np.full(d, shift), np.full(d, 1.3 if shift else 1.0)
    closed = (expected_cubic_kernel(m1, s1, m1, s1) + expected_cubic_kernel(m2, s2, m2, s2)
              - 2 * expected_cubic_kernel(m1, s1, m2, s2))
    rng = np.random.default_rng(4)
    draws = [fid.kid(m1 + s1 * rng.normal(size=(400, d)), m2 + s2 * rng.normal(size=(400, d)), subsets=1)
             for _ in range(40)]
    standard_error = np.std(draws) / len(draws) ** 0.5
    assert abs(np.mean(draws) - closed) < 4 * standard_error + 1e-12
    if shift:
        assert closed > 20 * standard_error  # the test can tell the two cases apart


def test_unbiased_mmd_matches_the_pairwise_definition():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    cross = sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    assert fid.mmd2_unbiased(x, y) == pytest.approx(within - 2 * cross, rel=1e-12)


def channel_stats(x):
    """A stand-in feature extractor: per-channel means and standard deviations of [0,1] images, (B, 6)."""
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).numpy()


def write_pngs(folder, arrays):
    folder.mkdir(parents=True)
    files = []
    for i, a in enumerate(arrays):
        files.append(folder / f"{i:05d}.png")
        Image.fromarray(a).save(files[-1])
    return files


def test_set_metrics_from_folders_with_an_injected_extractor(tmp_path):
    rng = np.random.default_rng(6)
    labels = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    recons = [np.clip(a * 0.5 + 40, 0, 255).astype(np.uint8) for a in labels]  # low contrast, brighter
    label_files, recon_files = write_pngs(tmp_path / "label", labels), write_pngs(tmp_path / "recon", recons)
    feats = lambda arrays: channel_stats(torch.from_numpy(np.stack(arrays) / 255).permute(0, 3, 1, 2).float())
    f_recon, f_label = feats(recons), feats(labels)
    scores = fid.set_metrics(recon_files, label_files, channel_stats)
    assert scores["fid"] == pytest.approx(fid.frechet_distance(*fid.statistics(f_recon), *fid.statistics(f_label)),
                                          rel=1e-5)
    assert scores["kid"] == pytest.approx(fid.kid(f_recon, f_label), rel=1e-5) and scores["kid"] > 0
    # the official style stretches each image first, which undoes most of the contrast change
    official = fid.set_metrics(recon_files, label_files, channel_stats, style="official")
    assert official["fid"] < 0.1 * scores["fid"]


def test_read_png_is_rgb_float32_in_0_1_for_grey_and_rgba_files(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgba = np.dstack([grey, 255 - grey, grey // 2, np.full_like(grey, 7)])  # alpha is dropped, as pytorch-fid
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = fid.read_png(tmp_path / "grey.png")
    assert x.dtype == torch.float32 and x.shape == (1, 3, 3, 4)
    np.testing.assert_array_equal(x[0].numpy(), np.stack([grey] * 3).astype(np.float32) / 255)
    np.testing.assert_array_equal(fid.read_png(tmp_path / "rgba.png")[0].numpy(),
                                  rgba[..., :3].transpose(2, 0, 1).astype(np.float32) / 255)


def three_level_images(rng, levels, n):
    """n (8,8,3) uint8 images of the three given levels, each holding its lowest and highest level."""
    arrays = [rng.choice(np.array(levels, dtype=np.uint8), (8, 8, 3)) for _ in range(n)]
    for a in arrays:
        a[0, 0, 0], a[0, 0, 1] = levels[0], levels[2]
    return arrays


def test_features_are_float64_and_the_official_style_stretches_both_sets(tmp_path):
    """Levels lo < lo + 0.4·(hi − lo) < hi min-max stretch to 0, 0.4 and 1, and 8-bit quantisation keeps 0.4 as
    102/255 (0.4·255 + 0.5 = 102.5, half a step from either rounding), so the official view is known in advance."""
    rng = np.random.default_rng(10)
    recon, label = three_level_images(rng, (50, 90, 150), 4), three_level_images(rng, (0, 48, 120), 5)
    recon_files, label_files = write_pngs(tmp_path / "recon", recon), write_pngs(tmp_path / "label", label)
    f = fid.features(recon_files, lambda x: channel_stats(x).astype(np.float32))
    assert f.dtype == np.float64 and f.shape == (4, 6)
    stretch = lambda arrays, levels: [np.select([a == v for v in levels], [0.0, 102 / 255, 1.0]) for a in arrays]
    by_hand = lambda arrays: channel_stats(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float())
    f_recon, f_label = by_hand(stretch(recon, (50, 90, 150))), by_hand(stretch(label, (0, 48, 120)))
    np.testing.assert_allclose(fid.features(recon_files, channel_stats, style="official"), f_recon, rtol=1e-6)
    scores = fid.set_metrics(recon_files, label_files, channel_stats, style="official")
    assert scores["fid"] == pytest.approx(fid.frechet_distance(*fid.statistics(f_recon), *fid.statistics(f_label)),
                                          rel=1e-6)
    plain = fid.set_metrics(recon_files, label_files, channel_stats)["fid"]
    assert abs(plain - scores["fid"]) > 0.1 * scores["fid"]  # the stretch matters for these sets


@pytest.mark.parametrize("sizes", [(1, 3), (3, 1)])
def test_set_metrics_needs_two_images_in_each_set(tmp_path, sizes):
    rng = np.random.default_rng(11)
    files = write_pngs(tmp_path / "all", [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(4)])
    with pytest.raises(ValueError, match="^FID/KID need at least 2 images in each set$"):
        fid.set_metrics(files[:sizes[0]], files[1:1 + sizes[1]], channel_stats)
    scores = fid.set_metrics(files[:2], files[2:], lambda x: x.mean((2, 3)).numpy())  # 2 and 2: a score
    assert np.isfinite(scores["fid"]) and np.isfinite(scores["kid"])


def test_missing_pytorch_fid_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails as it does without torchvision
    with pytest.raises(MetricUnavailable) as err:
        fid.load_inception()
    assert "\n" not in str(err.value) and "pip install pytorch-fid" in str(err.value)
    assert "(No module named " in str(err.value)  # the import error's own first line is the reason


@pytest.mark.parametrize("error", [OSError("libtorchvision.so: undefined symbol\nsecond line"), RuntimeError()])
def test_a_broken_torchvision_is_named_by_its_first_line_or_its_type(monkeypatch, error):
    class Failing(types.ModuleType):
        def __getattr__(self, name):
            raise error

    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", Failing("pytorch_fid.inception"))
    with pytest.raises(MetricUnavailable) as err:
        fid.load_inception()
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    assert f"({reason})" in str(err.value) and "\n" not in str(err.value)


def fake_pytorch_fid(monkeypatch):
    """A stand-in pytorch_fid.inception whose InceptionV3 records how it was built and returns (B,2048,1,1)."""
    built = []

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}

        def __init__(self, blocks):
            super().__init__()
            self.register_buffer("marker", torch.zeros(1))  # follows the model's .to(device)
            built.append(blocks)

        def forward(self, x):
            built.append((x.device.type, self.marker.device.type))
            return [x.mean((1, 2, 3))[:, None, None, None].expand(-1, 2048, 1, 1).to(self.marker.device)]

    module = types.ModuleType("pytorch_fid.inception")
    module.InceptionV3 = InceptionV3
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
    return built


def test_missing_inception_weights_name_the_file_and_folder(monkeypatch, tmp_path):
    built = fake_pytorch_fid(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MetricUnavailable) as err:
        fid.load_inception()
    message = str(err.value)
    assert "\n" not in message and fid.INCEPTION_FILE in message and str(tmp_path / "hub" / "checkpoints") in message
    assert built == []  # nothing was built, so nothing could try to download
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / fid.INCEPTION_FILE).write_bytes(b"stand-in")
    features = fid.load_inception()(torch.rand(3, 3, 8, 8))
    assert built == [[3], ("cpu", "cpu")] and features.shape == (3, 2048) and features.dtype == np.float64
    built.clear()
    with pytest.raises(NotImplementedError):  # a meta tensor has no data to copy back; where it went is recorded
        fid.load_inception(device="meta")(torch.rand(1, 3, 8, 8))
    assert built == [[3], ("meta", "meta")]  # the model and its input are both moved to the device asked for


def test_the_command_line_prints_help_and_refuses_too_few_images(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        fid_command.main(["--help"])
    assert done.value.code == 0 and "usage: python -m treg fid" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="at least 2 PNGs in each folder"):
        fid_command.main([str(tmp_path), str(tmp_path), "--device", "cpu"])

