"""Set metrics between two folders of images: Fréchet distance (FID) and kernel distance (KID) of their features.

The maths (`frechet_distance`, `kid`) takes feature arrays; `set_metrics` reads image files, maps them to features
with any injected `extractor` ((B,3,H,W) float in [0,1] -> (B,D)) and scores them. The paper's FID is pytorch-fid's:
its InceptionV3 pool3 features (2048-d) of the saved PNGs, 250 reconstructions against 250 ground truths.
`load_inception` wraps exactly that network; it is an optional extra, because pytorch-fid needs torchvision, which
does not import beside the CPU torch that CI installs. When pytorch-fid or its weights are missing it raises
MetricUnavailable with one line saying what to install or which file to put where, and callers go on without FID.

- FID = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½, with unbiased covariances as pytorch-fid (np.cov).
  The trace term is computed from symmetric eigendecompositions, so it stays real and exact when the covariances
  are singular (250 images give rank ≤ 249 in 2048 dimensions), where pytorch-fid's sqrtm needs an ε offset.
- KID = the unbiased MMD² with the cubic polynomial kernel k(a, b) = (aᵀb/D + 1)³ (Bińkowski et al., ICLR 2018),
  averaged over random subsets as clean-fid does (100 subsets of min(N, 1000) images).

    python -m treg fid WORKDIR/recon WORKDIR/label      # FID and KID of one run's PNGs (python -m treg gather: all)
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from treg.config import ConfigError
from treg.hub import resolve_device
from treg.metrics import MetricUnavailable, official_view

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID Inception weights
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"


def statistics(features):
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))  # np.cov gives a 0-d array for D = 1


def _psd_sqrt(s):
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 whatever the inputs' dtype."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def mmd2_unbiased(x, y):
    """The unbiased MMD² of samples x (m, D) and y (m, D) under k(a, b) = (aᵀb/D + 1)³."""
    m, d = x.shape
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / m ** 2)


def kid(features1, features2, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception distance: the mean unbiased MMD² over `subsets` random subsets of min(N, subset_size)."""
    x, y = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    rng = np.random.default_rng(seed)
    return float(np.mean([mmd2_unbiased(x[rng.choice(len(x), m, replace=False)],
                                        y[rng.choice(len(y), m, replace=False)]) for _ in range(subsets)]))


def read_png(path):
    """(1,3,H,W) float in [0,1], as pytorch-fid reads an image (RGB, /255)."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def features(files, extractor, style="ours"):
    """(N, D) float64 features of image files; `style="official"` first min-max stretches each image, as the
    official code's saved PNGs are (treg.metrics.official_view)."""
    out = []
    with torch.no_grad():
        for path in files:
            x = read_png(path)
            out.append(np.asarray(extractor(official_view(x) if style == "official" else x), dtype=np.float64))
    return np.concatenate(out)


def set_metrics(recon_files, label_files, extractor, style="ours"):
    """{'fid', 'kid'} between two lists of image files (reconstructions, ground truths)."""
    if len(recon_files) < 2 or len(label_files) < 2:
        raise ValueError("FID/KID need at least 2 images in each set")
    f1, f2 = features(recon_files, extractor, style), features(label_files, extractor, style)
    return {"fid": frechet_distance(*statistics(f1), *statistics(f2)), "kid": kid(f1, f2)}


def load_inception(device="cpu"):
    """pytorch-fid's InceptionV3 pool3 (2048-d) as an extractor [0,1] images -> (B, 2048) numpy; the weights are
    read from torch's hub cache, never downloaded. MetricUnavailable (one line) when anything is missing."""
    try:
        from pytorch_fid.inception import InceptionV3
    except Exception as err:  # a torchvision built for another torch fails with OSError or RuntimeError too
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise MetricUnavailable(f"FID/KID need pytorch-fid and a torchvision that imports ({reason}): "
                                f"pip install pytorch-fid where torch has a matching torchvision") from None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not weights.is_file():
        raise MetricUnavailable(f"FID/KID need the Inception weights: put {INCEPTION_FILE} ({INCEPTION_URL}) "
                                f"in {weights.parent}")
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()  # loads the cached file
    return lambda x: model(x.to(device))[0].flatten(1).double().cpu().numpy()
