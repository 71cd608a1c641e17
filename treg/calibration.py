"""The calibration bed: an analytic prior whose exact posterior has several modes of measurable width, exact draws
from that posterior, the statistics that compare a solver's outputs across seeds with those draws, and the
known-wrong solver variants those statistics must catch. `python -m treg.bench_calibration` runs them.

Bed. ×8 bicubic SR at 64² (configs/task/super-resolution-x8.yaml, σ = 0.01): M = A∘decode maps the 256 latent values
(4×8×8) to 192 measured ones and has a 64-dimensional null space. Components (s = 0.1 each):
    k = 0, 1, 2   encode(cat_1.jpg) + δ_k, δ_k orthogonal null-space "details" of RMS 0.3 (68 s apart),
                  captioned "striped", "spotted", "plain": the measurement of the cat cannot tell them apart;
    k = 3         encode(rocket.jpg), captioned "rocket": a measurement of the cat rules it out.
Text weights π_k(e) ∝ π0_k·exp(β cos(e, c_k)) with base weights π0 = 0.75·(0.6, 0.3, 0.1) and 0.25, and β = 1, soft
enough that w matters. The empty prompt (a zero embedding) gives π0 exactly, so without text the exact posterior of a
cat measurement puts 0.6/0.3/0.1 on the three details: a solver that lands uniformly, or always in the likeliest
mode, is off by a measurable total-variation distance. s = 0.1 (the AnalyticPrior default) makes the spread
measurable: the posterior std is s = 0.1 per null-space direction and about σ = 0.01 per measured one.

Posterior. Σ = (I/s² + MᵀM/σ²)⁻¹ is diagonal in the eigenbasis V of the dense MᵀM (eigenvalues λ): variance
1/(1/s² + λ/σ²) per eigenvector, so an exact draw is m_k + V(√var ⊙ n), n ~ N(0, I). The weights come from
treg.bench_accuracy.dense_posterior; the CFG-tilted target of guidance w is the exact posterior of the prior
π_uc^(1−w)·π_c^w (exact for components that do not overlap, as here).
"""
import inspect
import math
import textwrap
from dataclasses import dataclass

import numpy as np
import torch

from treg import solvers
from treg.analytic import SAMPLES, AnalyticPrior, load_image
from treg.bench_accuracy import dense_posterior, hidden_details, latent_gram
from treg.config import load_task
from treg.operators import build_operator, measure

TASK = "super-resolution-x8"
IMAGE_SIZE = 64
DETAILS = ("striped", "spotted", "plain")  # captions of the three hidden details of the cat
CONFLICT = "rocket"                         # caption of the component that a cat measurement rules out
BASE_WEIGHTS = (0.45, 0.225, 0.075, 0.25)   # π0: 0.75·(0.6, 0.3, 0.1) on the details, 0.25 on the rocket
STD = 0.1                                   # s, the component width (latent units)
DETAIL_RMS = 0.3                            # RMS per latent value of each detail δ_k
BETA = 1.0                                  # text sharpness: "plain" moves its weight from 0.1 to 0.23 of the details
SUPPORT = 1e-3                              # posterior weight below which a component is ruled out by y
BOOTSTRAP = 1000                            # resamples of the seeds for every confidence interval (95 %, percentile)
PAIRED_BOOTSTRAP = 4000                     # resamples for the sensitivity's Bonferroni-corrected (99.4 %) intervals


class WeightedPrior(AnalyticPrior):
    """An AnalyticPrior with base weights π0: π_k(e) ∝ π0_k·exp(β cos(e, c_k)); the zero embedding gives π0."""

    def __init__(self, captions, *, base_weights, **kwargs):
        super().__init__(captions, **kwargs)
        self.log_base = torch.tensor(base_weights, dtype=torch.float32).log()

    def log_weights(self, e):
        return torch.log_softmax(super().log_weights(e) + self.log_base.to(e.device), dim=-1)


@dataclass
class Bed:
    """The prior, the operator, one measurement y (1, 3, 8, 8) of the cat with its "striped" detail, M = A∘decode
    as a dense (n, m) matrix acting on flat latents from the right (z @ M), MᵀM as `gram`, the exact
    posterior means (K, n) (the same for every prompt; n = 256 latent values), and MᵀM's eigenbasis `basis`
    (n, n) with `measured` (n,) marking the eigenvectors M sees and `variance` (n,) the posterior variance along
    each."""
    prior: WeightedPrior
    op: torch.nn.Module
    sigma: float
    y: torch.Tensor
    matrix: torch.Tensor
    gram: torch.Tensor
    means: torch.Tensor
    basis: torch.Tensor
    measured: torch.Tensor
    variance: torch.Tensor
    latent_shape: tuple = (4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)

    @property
    def captions(self):
        return self.prior.captions

    def posterior_log_weights(self, prompt):
        """log p(k | y, prompt) (K,) float64 of the exact posterior."""
        return dense_posterior(self.prior, self.op, self.gram, self.y, prompt, self.sigma).log_weights

    def tilted_log_weights(self, prompt, w):
        """Posterior weights of the CFG-tilted prior π_uc^(1−w)·π_c^w (uc = the empty prompt, π_uc = π0)."""
        log_pi_c, log_pi_uc = self.prior.log_weights(self.prior.embed([prompt, ""])).double()
        return torch.log_softmax(self.posterior_log_weights("") + w * (log_pi_c - log_pi_uc), dim=0)

    def exact_draws(self, log_weights, n, generator):
        """n exact posterior draws (n, 4, 8, 8) float64 and their components (n,): k ~ w, z = m_k + V(√var ⊙ n)."""
        k = torch.multinomial(log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, len(self.variance), generator=generator, dtype=torch.float64)
        z = self.means[k] + (noise * self.variance.sqrt()) @ self.basis.T
        return z.view(n, *self.latent_shape), k

    def residuals(self, z):
        """‖y − M z‖ / (σ√m) per latent (B, 4, 8, 8): 1 = the noise floor."""
        misfit = self.y.double().flatten() - z.double().flatten(1) @ self.matrix
        return misfit.norm(dim=1) / (self.sigma * self.y.numel() ** 0.5)


def build_bed(root, seed=0):
    """The bed of the module docstring, with y = M μ_0 + σn, n from torch.Generator().manual_seed(seed)."""
    task = load_task(root / f"configs/task/{TASK}.yaml", IMAGE_SIZE)
    op = build_operator(task.operator, IMAGE_SIZE, **task.params)
    sigma = task.noise_scale
    base = AnalyticPrior(["base"], means=torch.zeros(1, 4, 1, 1))
    images = torch.cat([load_image(SAMPLES / name, IMAGE_SIZE) for name in ("cat_1.jpg", "rocket.jpg")]).double()
    content = base.encode(images)  # (2, 4, 8, 8)
    gram, forward, _ = latent_gram(base, op, content.shape[1:])
    n = gram.shape[0]
    matrix = forward(torch.eye(n, dtype=torch.float64).view(n, *content.shape[1:])).flatten(1)  # (n, m)
    details, info = hidden_details(gram, forward, content.shape[1:], sigma, len(DETAILS), rms=DETAIL_RMS)
    assert info["kind"] == "null space", info  # ×8 SR at 64² has 64 null directions
    means = torch.cat([content[:1] + details, content[1:]]).float()
    prior = WeightedPrior([*DETAILS, CONFLICT], means=means, std=STD, beta=BETA, base_weights=BASE_WEIGHTS)
    x = prior.decode(prior.means(8, 8)[:1])
    y = measure(op, x, sigma, torch.Generator().manual_seed(seed))
    lam, basis = torch.linalg.eigh(gram)
    measured = lam > 1e-9 * lam.max()
    variance = 1 / (1 / STD ** 2 + lam.clamp(min=0) * measured / sigma ** 2)
    post_means = dense_posterior(prior, op, gram, y, "", sigma).means.flatten(1)
    return Bed(prior, op, sigma, y, matrix, gram, post_means, basis, measured, variance)


# Statistics over seeds. Each takes the per-seed arrays of one cell and an index array (a bootstrap resample).

def landing_frequencies(landed, count, index):
    return np.bincount(landed[index], minlength=count) / len(index)


def total_variation(landed, target, index):
    """½ Σ_k |frequency_k − target_k|."""
    return 0.5 * np.abs(landing_frequencies(landed, len(target), index) - target).sum()


def squared_spread(coords, landed):
    """Per seed, ‖coords − its component's sample mean‖² · n_k/(n_k − 1) (unbiased for the component's variance
    trace in these coordinates); NaN for a component landed in once. coords (N, d) are eigen-coordinates."""
    out = np.full(len(landed), np.nan)
    for k in np.unique(landed):
        mine = landed == k
        if mine.sum() > 1:
            out[mine] = ((coords[mine] - coords[mine].mean(0)) ** 2).sum(1) * mine.sum() / (mine.sum() - 1)
    return out


def spread_ratio(squares, expected, index):
    """Mean within-component squared spread of the solutions over the exact posterior's (its covariance trace in
    the same directions): 1 = calibrated, → 0 = collapsed to a point, > 1 = over-dispersed."""
    return np.nanmean(squares[index]) / expected if np.isfinite(squares[index]).any() else float("nan")


def wasserstein(reference, n):
    """W1(sample, reference) as a function of a sample of size n: ∫₀¹ |F⁻¹_sample(q) − F⁻¹_reference(q)| dq, exact,
    with both quantile functions piecewise constant between the breakpoints i/n and j/len(reference)."""
    ref = np.sort(reference)
    edges = np.union1d(np.arange(n + 1) / n, np.arange(len(ref) + 1) / len(ref))
    mid, width = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
    at_ref, at_sample = ref[(mid * len(ref)).astype(int)], (mid * n).astype(int)
    return lambda sample: (np.abs(np.sort(sample)[at_sample] - at_ref) * width).sum()


def interval(statistic, n, seed=0, level=0.95, resamples=BOOTSTRAP):
    """(value, low, high): the statistic on all n seeds and its bootstrap percentile interval."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    values = values[np.isfinite(values)]  # e.g. a spread on a resample that lands in every component once
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)]) if len(values) else (np.nan, np.nan)
    return float(statistic(np.arange(n))), float(low), float(high)


def statistics(bed, z, target_log_weights, reference):
    """The statistics of one cell of solutions z (N, 4, 8, 8), one per seed, against the exact posterior with
    weights `target_log_weights`, `reference` holding exact residuals: {name: fn(index array) → value}, and the
    per-seed data (for the JSON)."""
    means = bed.means
    z = z.double().flatten(1)
    landed = torch.cdist(z, means).argmin(1)
    target = target_log_weights.exp().numpy()
    coords = ((z - means[landed]) @ bed.basis).numpy()  # eigen-coordinates of the deviation
    residuals = bed.residuals(z.view(-1, *bed.latent_shape)).numpy()
    rel_l2 = ((z - means[landed]).norm(dim=1) / means[landed].norm(dim=1)).numpy()
    landed = landed.numpy()
    seen, var = bed.measured.numpy(), bed.variance.numpy()
    consistent = (target[landed] >= SUPPORT).astype(float)
    squares_seen, squares_null = squared_spread(coords[:, seen], landed), squared_spread(coords[:, ~seen], landed)
    residual_w1 = wasserstein(reference, len(landed))  # to the exact posterior's residuals, in noise floors
    fns = {
        "tv": lambda i: total_variation(landed, target, i),
        "spread_measured": lambda i: spread_ratio(squares_seen, var[seen].sum(), i),
        "spread_null": lambda i: spread_ratio(squares_null, var[~seen].sum(), i),
        "residual": lambda i: residuals[i].mean(),
        "residual_w1": lambda i: residual_w1(residuals[i]),
        "rel_l2": lambda i: rel_l2[i].mean(),
        "consistent": lambda i: consistent[i].mean(),
    }
    for k, caption in enumerate(bed.captions):
        fns[f"landed_{caption}"] = lambda i, k=k: landing_frequencies(landed, len(target), i)[k]
    per_seed = {"landed": landed.tolist(), "residual": residuals.round(4).tolist(), "rel_l2": rel_l2.round(5).tolist()}
    return fns, {"target": target.round(6).tolist(), **per_seed}


def intervals(fns, n, seed=0):
    """{name: (value, low, high)} for every statistic, all on the same bootstrap resamples of the n seeds."""
    return {name: interval(fn, n, seed) for name, fn in fns.items()}


def paired_differences(correct, wrong, n, seed=0):
    """{name: interval of (variant − correct)} for the statistics of two cells solved with the same n seeds: the
    paired difference, resampling seeds jointly, is far tighter than two separate intervals. The intervals are
    Bonferroni-corrected (95 % jointly over the statistics), so a variant flagged by any is flagged at 5 %."""
    names = [name for name in correct if not name.startswith("landed_")]
    level = 1 - 0.05 / len(names)
    return {name: interval(lambda i, f=correct[name], g=wrong[name]: g(i) - f(i), n, seed, level, PAIRED_BOOTSTRAP)
            for name in names}


# Known-wrong variants: patched copies of a solver, compiled from its source with one expression replaced, so the
# library stays clean and a variant fails loudly (instead of silently becoming the correct solver) if the source moves.
# The control changes only floating-point rounding (the same maths): the sensitivity check must not flag it.

VARIANTS = {  # name: (solver, what is changed, expression in the source, replacement)
    "treg-no-eps-renoise": ("treg", "TReg without the (1−ᾱ')·ε̂ re-noising term",
                            "+ (1 - a_prev) * eps + (a_prev", "+ (a_prev"),
    "treg-abar-blend": ("treg", "TReg with ᾱ in place of ᾱ' in the blend",
                        "a_prev * z0y + (1 - a_prev) * z0", "a * z0y + (1 - a) * z0"),
    "psld-adjoint": ("psld", "PSLD with Aᵀ in place of A⁺", "op.pinv(y - op.A(x0))", "op.At(y - op.A(x0))"),
    "dps-squared": ("dps", "DPS with the squared norm", "dps_gradient(prior, op, y, z, t, a, eps_fn)",
                    "tweedie_gradient(prior, z, a, eps_fn, lambda z0, x0: residual_norm(op, y, x0) ** 2)"),
    "control": ("treg", "control: TReg's blend as ẑ0 + ᾱ'(ẑ0ʸ − ẑ0), the same maths (must not be flagged)",
                "a_prev * z0y + (1 - a_prev) * z0", "z0 + a_prev * (z0y - z0)"),
}


def patched_copy(fn, old, new):
    """A copy of `fn` compiled from its source in its module's namespace, with the one occurrence of `old`
    replaced by `new`."""
    source = textwrap.dedent(inspect.getsource(fn))
    if source.count(old) != 1:
        raise RuntimeError(f"{fn.__name__}: expected {old!r} exactly once in its source, found {source.count(old)}")
    namespace = dict(inspect.unwrap(fn).__globals__)  # the module of the solver, not of its decorator
    exec(compile(source.replace(old, new), f"<{fn.__name__}, patched>", "exec"), namespace)
    return namespace[fn.__name__]


def variant(name):
    """(base solver name, patched solver function) of a known-wrong variant."""
    base, _, old, new = VARIANTS[name]
    return base, patched_copy(solvers.SOLVERS[base][0], old, new)


def flagged(differences):
    """{name: strength} of the statistics whose paired-difference interval excludes 0, strongest first; strength is
    the difference over the half-width of its interval."""
    out = {}
    for name, (value, low, high) in differences.items():
        if low > 0 or high < 0:
            out[name] = abs(value) / ((high - low) / 2) if high > low else math.inf
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
