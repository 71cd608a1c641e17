"""The calibration bed: an analytic prior whose exact posterior has several modes of measurable width, exact draws
from that posterior, the statistics that compare a solver's outputs across seeds with those draws, and the
known-wrong solver variants those statistics must catch. `python -m treg bench calibration` runs them.

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
treg.priors.posterior.dense_posterior; the CFG-tilted target of guidance w is the exact posterior of the prior
π_uc^(1−w)·π_c^w (exact for components that do not overlap, as here).

Exact CFG sampler. The tilted posterior is not what CFG sampling gives (CFG's field is not the score of any noised
tilted mixture). `CFGField` is the exact field of the guided probability-flow ODE on this bed and `cfg_ode`
integrates it: guided score (1−w)∇log p_t(z|"") + w∇log p_t(z|c) of the exact noised mixture, plus, for the
posterior, the exact ∇log p̃(y | z_t) of y under the tilted mixture weights π̃ ∝ π_uc^(1−w)·π_c^w (so w = 0 and w = 1
are the exact posteriors under "" and c). Derivation: given z_t and component k, z0 ~ N(μ_k + g(z_t − √ᾱμ_k), cI)
with v = ᾱs² + 1 − ᾱ, g = √ᾱs²/v, c = s²(1 − ᾱ)/v; so y | z_t, k ~ N(M(μ_k + g(z_t − √ᾱμ_k)), cMMᵀ + σ²I),
diagonal in M's SVD basis (M = U diag(S) Vᵀ: measured coordinate i of Uᵀz has variance cS_i² + σ²), and
log p̃(y | z_t) = logsumexp_k(log r̃_k(z_t) + log p(y | z_t, k)) with r̃_k the tilted responsibilities; its gradient is
Σ_k ρ_k(s_k + ∇ℓ_k) − Σ_k r̃_k s_k (ρ ∝ r̃_k p(y | z_t, k), s_k = −(z_t − √ᾱμ_k)/v).
"""
import dataclasses
import inspect
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from treg.config import CONFIGS, SAMPLES, ConfigError, load_task
from treg.operators import build_operator, measure
from treg.priors.analytic import AnalyticPrior, load_image
from treg.priors.posterior import dense_posterior, landed_component, latent_gram
from treg.profiling import PRIOR_PARTS, Profiler
from treg.solvers import SOLVERS, configure, with_noise
from treg.solvers.latent import residual_norm

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
PAIRED_BOOTSTRAP = 4000                     # resamples for the sensitivity's Bonferroni-corrected intervals
PERMUTATIONS = 2000                         # sign flips of the sensitivity's paired permutation test
FAMILY_LEVEL = 0.05                         # familywise level of the sensitivity flags (Bonferroni over TESTED)
TESTED = ("tv", "spread_measured", "spread_null", "residual", "residual_w1", "rel_l2", "consistent")  # sensitivity's


class WeightedPrior(AnalyticPrior):
    """An AnalyticPrior with base weights π0: π_k(e) ∝ π0_k·exp(β cos(e, c_k)); the zero embedding gives π0."""

    def __init__(self, captions, *, base_weights, **kwargs):
        super().__init__(captions, **kwargs)
        self.log_base = torch.tensor(base_weights, dtype=torch.float64).log()

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


class CFGField:
    """The exact guided field of the bed at guidance w for `prompt`, in the coordinates a = z U of M's left singular
    vectors (M = U diag(S) Vᵀ; y' = y V, so measured coordinate i sees y'_i = S_i a0_i + σn), where every component
    stays isotropic. `with_y` adds the exact ∇log p̃(y | z_t) of the module docstring."""

    def __init__(self, bed, prompt, w, with_y=True):
        u, s, vh = torch.linalg.svd(bed.matrix, full_matrices=True)  # (n, n), (m,), (m, m)
        self.u, self.s, self.w, self.with_y, self.sigma = u, s, w, with_y, bed.sigma
        self.y = bed.y.double().flatten() @ vh.T  # (m,)
        self.mu = bed.prior.means(*bed.latent_shape[1:]).double().flatten(1) @ u  # (K, n)
        self.std = bed.prior.std
        log_pi_uc, log_pi_c = bed.prior.log_weights(bed.prior.embed(["", prompt])).double()
        self.log_pi = log_pi_uc, log_pi_c
        self.log_tilted = torch.log_softmax((1 - w) * log_pi_uc + w * log_pi_c, dim=0)

    def score(self, a, abar):
        """The guided score (B, n) at ᾱ of latents a (B, n) in the rotated coordinates. Every per-component term is
        expanded so that only (B, K) and (B, n) arrays are formed: Σ_k r_k s_k = −(a − √ᾱ r μ)/v."""
        v, root = abar * self.std ** 2 + 1 - abar, abar ** 0.5
        log_near = (root * a @ self.mu.T - 0.5 * abar * (self.mu ** 2).sum(1)) / v  # (B, K): −‖a − √ᾱμ_k‖²/(2v) + f(a)
        mix = lambda log_pi: -(a - root * torch.softmax(log_pi + log_near, dim=1) @ self.mu) / v
        out = (1 - self.w) * mix(self.log_pi[0]) + self.w * mix(self.log_pi[1])
        if not self.with_y:
            return out
        g, c, m = root * self.std ** 2 / v, self.std ** 2 * (1 - abar) / v, len(self.s)
        var = c * self.s ** 2 + self.sigma ** 2  # Cov(y' | a, k), diagonal
        e = self.y - self.s * g * a[:, :m]  # y' − S E[a0 | a, k] = e − f_k
        f = self.s * (1 - g * root) * self.mu[:, :m]  # (K, m)
        log_lik = e @ (f / var).T - 0.5 * (f ** 2 / var).sum(1)  # (B, K): log p(y | a, k) up to a constant in k
        rho = torch.softmax(self.log_tilted + log_near + log_lik, dim=1)  # p̃(k | a, y)
        grad = mix(self.log_tilted + log_lik) - mix(self.log_tilted)  # Σ_k ρ_k s_k − Σ_k r̃_k s_k
        grad[:, :m] += g * self.s * (e - rho @ f) / var  # Σ_k ρ_k ∇_a log p(y | a, k)
        return out + grad

    def eps(self, a, abar):
        return -(1 - abar) ** 0.5 * self.score(a, abar)


SIGMA_MAX, SIGMA_MIN = 1e4, 1e-4  # the exact sampler's noise range in σ = √((1−ᾱ)/ᾱ): ᾱ from 1e-8 to 1 − 1e-8


def cfg_ode(field, noise, steps, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN):
    """The guided probability-flow ODE in DDIM's variables σ = √((1−ᾱ)/ᾱ), x̄ = a/√ᾱ, where it reads dx̄/dσ = ε̂(a)
    (DDIM is its Euler method): from a = noise (B, n) at σ_max, Heun's method on `steps` intervals geometric in σ
    down to σ_min, then the Tweedie step x̄ − σ_min ε̂ to σ = 0. The defaults make it the exact sampler: at σ_max =
    1e4 every noised law is N(0, I) in a to 1e-4·‖μ‖, and σ_min lies far below the measured directions' posterior
    std (0.014). sigma_max = σ(ᾱ_999) = 14.6 is the samplers' start instead. Returns latents (B, n) in the
    original coordinates."""
    abar = lambda sigma: 1 / (1 + sigma ** 2)
    grid = np.geomspace(sigma_max, sigma_min, steps + 1).tolist()  # floats: a NumPy scalar × tensor is slow
    x = noise.double() * (1 + grid[0] ** 2) ** 0.5  # x̄ = a/√ᾱ
    for s0, s1 in zip(grid[:-1], grid[1:]):
        d0 = field.eps(x * abar(s0) ** 0.5, abar(s0))
        guess = x + (s1 - s0) * d0
        x = x + (s1 - s0) * (d0 + field.eps(guess * abar(s1) ** 0.5, abar(s1))) / 2
    x = x - grid[-1] * field.eps(x * abar(grid[-1]) ** 0.5, abar(grid[-1]))
    return x @ field.u.T


# Statistics over seeds. Each takes the per-seed arrays of one cell and an index array (..., n): one resample of the
# n seeds per row, so that a stack of bootstrap resamples or permutations is evaluated at once.

def landing_frequencies(landed, count, index):
    """(..., count) frequency of each component among the seeds of `index`."""
    return (landed[index][..., None] == np.arange(count)).mean(-2)


def total_variation(landed, target, index):
    """½ Σ_k |frequency_k − target_k|."""
    return 0.5 * np.abs(landing_frequencies(landed, len(target), index) - target).sum(-1)


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
    the same directions): 1 = calibrated, → 0 = collapsed to a point, > 1 = over-dispersed. NaN for a resample
    without any finite square (every component landed in once)."""
    picked = squares[index]
    finite = np.isfinite(picked)
    count = finite.sum(-1)
    total = np.where(finite, picked, 0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan) / expected


def wasserstein(reference):
    """W1(sample, reference) as a function of a sample (..., n): ∫₀¹ |F⁻¹_sample(q) − F⁻¹_reference(q)| dq, exact,
    with both quantile functions piecewise constant between the breakpoints i/n and j/len(reference)."""
    ref = np.sort(reference)

    def distance(sample):
        n = sample.shape[-1]
        edges = np.union1d(np.arange(n + 1) / n, np.arange(len(ref) + 1) / len(ref))
        mid, width = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
        at_ref, at_sample = ref[(mid * len(ref)).astype(int)], (mid * n).astype(int)
        return (np.abs(np.sort(sample, axis=-1)[..., at_sample] - at_ref) * width).sum(-1)
    return distance


def interval(statistic, n, seed=0, level=0.95, resamples=BOOTSTRAP):
    """(value, low, high): the statistic on all n seeds and its bootstrap percentile interval."""
    rng = np.random.default_rng(seed)
    values = np.asarray(statistic(rng.integers(0, n, (resamples, n))), dtype=float)
    values = values[np.isfinite(values)]  # e.g. a spread on a resample that lands in every component once
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)]) if len(values) else (np.nan, np.nan)
    return float(statistic(np.arange(n))), float(low), float(high)


def statistics(bed, z, target_log_weights, reference, law=None):
    """The statistics of one cell of solutions z (N, 4, 8, 8), one per seed, against the exact posterior with
    weights `target_log_weights`, `reference` holding exact residuals: {name: fn(index array) → value}, and the
    per-seed data (for the JSON). With `law` (K,), the landing law of the exact CFG sampler, also `tv_cfg`."""
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
    residual_w1 = wasserstein(reference)  # to the exact posterior's residuals, in noise floors
    fns = {
        "tv": lambda i: total_variation(landed, target, i),
        "spread_measured": lambda i: spread_ratio(squares_seen, var[seen].sum(), i),
        "spread_null": lambda i: spread_ratio(squares_null, var[~seen].sum(), i),
        "residual": lambda i: residuals[i].mean(-1),
        "residual_w1": lambda i: residual_w1(residuals[i]),
        "rel_l2": lambda i: rel_l2[i].mean(-1),
        "consistent": lambda i: consistent[i].mean(-1),
    }
    if law is not None:
        fns["tv_cfg"] = lambda i: total_variation(landed, np.asarray(law), i)
    for k, caption in enumerate(bed.captions):
        fns[f"landed_{caption}"] = lambda i, k=k: landing_frequencies(landed, len(target), i)[..., k]
    per_seed = {"landed": landed.tolist(), "residual": residuals.round(4).tolist(), "rel_l2": rel_l2.round(5).tolist()}
    return fns, {"target": target.round(6).tolist(), **per_seed}


def intervals(fns, n, seed=0):
    """{name: (value, low, high)} for every statistic, all on the same bootstrap resamples of the n seeds."""
    return {name: interval(fn, n, seed) for name, fn in fns.items()}


def paired_differences(correct, wrong, n, seed=0):
    """{name: interval of (variant − correct)} for the statistics of two cells solved with the same n seeds: the
    paired difference, resampling seeds jointly, is far tighter than two separate intervals. Bonferroni-corrected
    (95 % jointly over the statistics). These describe the size of a difference; `flagged` decides by
    `permutation_pvalues`, whose level is exact."""
    level = 1 - FAMILY_LEVEL / len(TESTED)
    return {name: interval(lambda i, f=correct[name], g=wrong[name]: g(i) - f(i), n, seed, level, PAIRED_BOOTSTRAP)
            for name in TESTED}


def permutation_pvalues(pooled, n, seed=0, resamples=PERMUTATIONS):
    """{name: two-sided p-value} of the paired sign-flip test of "variant and correct are exchangeable within each
    seed", for the statistics `pooled` of both cells stacked (seeds 0..n−1 correct, n..2n−1 variant; statistics()
    of the 2n latents): each resample swaps the two solutions of every seed with probability ½ and recomputes the
    difference. Under the null every sign pattern is equally likely, so P(p ≤ α) ≤ α exactly, at any n;
    p = (1 + #{|permuted| ≥ |observed|})/(1 + resamples)."""
    rng = np.random.default_rng(seed)
    swap = np.vstack([np.zeros(n, int), rng.integers(0, 2, (resamples, n))])  # row 0: the observed labelling
    wrong, correct = np.arange(n) + n * (1 - swap), np.arange(n) + n * swap
    out = {}
    for name in TESTED:
        diff = pooled[name](wrong) - pooled[name](correct)
        observed = abs(diff[0])
        out[name] = float((1 + (np.abs(diff[1:]) >= observed - 1e-12 * max(observed, 1)).sum()) / (1 + resamples))
    return out


def flagged(pvalues, level=FAMILY_LEVEL):
    """{name: p-value} of the statistics whose permutation p-value is at most level/(number tested) (Bonferroni:
    familywise level `level`), smallest first."""
    out = {name: p for name, p in pvalues.items() if p <= level / len(pvalues)}
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def bootstrap_flags(differences):
    """The previous rule, kept to measure its false-flag rate: the statistics whose Bonferroni-corrected paired
    bootstrap interval excludes 0."""
    return [name for name, (_, low, high) in differences.items() if low > 0 or high < 0]


def false_flag_rate(bed, log_weights, reference, n, repeats, seed=0):
    """Under a genuine null, two independent cells of n exact posterior draws each, repeated: {rule: (families
    flagged, repeats)} for the permutation rule (`flagged`) and the bootstrap-interval rule."""
    generator = torch.Generator().manual_seed(seed)
    counts = {"permutation": 0, "bootstrap": 0}
    for r in range(repeats):
        z = bed.exact_draws(log_weights, 2 * n, generator)[0]
        pooled, _ = statistics(bed, z, log_weights, reference)
        first, _ = statistics(bed, z[:n], log_weights, reference)
        second, _ = statistics(bed, z[n:], log_weights, reference)
        counts["permutation"] += bool(flagged(permutation_pvalues(pooled, n, seed=r)))
        counts["bootstrap"] += bool(bootstrap_flags(paired_differences(first, second, n, seed=r)))
    return {rule: (count, repeats) for rule, count in counts.items()}


# Known-wrong variants: patched copies of a solver, compiled from its source with one expression replaced, so the
# library stays clean and a variant fails loudly (instead of silently becoming the correct solver) if the source moves.
# The control (CONTROL, not a variant) is the correct solver on disjoint seeds: a genuine null.

VARIANTS = {  # name: (solver, what is changed, expression in the source, replacement)
    "treg-no-eps-renoise": ("treg", "TReg without the (1−ᾱ')·ε̂ re-noising term",
                            "+ (1 - a_prev) * eps + (a_prev", "+ (a_prev"),
    "treg-abar-blend": ("treg", "TReg with ᾱ in place of ᾱ' in the blend",
                        "a_prev * z0y + (1 - a_prev) * z0", "a * z0y + (1 - a) * z0"),
    "psld-adjoint": ("psld", "PSLD with Aᵀ in place of A⁺", "op.pinv(y - op.A(x0))", "op.At(y - op.A(x0))"),
    "dps-squared": ("dps", "DPS with the squared norm", "dps_gradient(prior, op, y, z, t, a, eps_fn)",
                    "tweedie_gradient(prior, z, a, eps_fn, lambda z0, x0: residual_norm(op, y, x0) ** 2)"),
}
CONTROL = ("control", "treg", "control: TReg against TReg on disjoint seeds (a genuine null; must not be flagged)")


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
    return base, patched_copy(SOLVERS[base][0], old, new)


# ------------------------------------------------------------ the hidden-detail grid (accuracy and warm-start beds)
IMAGES = ("cat_1.jpg", "coffee.jpg", "rocket.jpg")


def hidden_details(gram, forward, shape, sigma, count, rms=0.1, visible=0.5, seed=0):
    """`count` orthogonal latent "details" (count, *shape) float64 that the measurement M cannot see.

    If M has a null space (SR, inpainting), the details are random orthogonal directions in it of RMS `rms` per
    latent value. If not (blur: M is injective on latents, only weakly on some directions), they lie along the
    weakest eigenvectors of MᵀM, scaled down until every pair differs by at most visible·σ in the measurement,
    i.e. below the noise. Also returns a dict describing them.
    """
    lam, vec = torch.linalg.eigh(gram)
    lam = lam.clamp(min=0)
    n = len(lam)
    null = int((lam <= 1e-9 * lam.max()).sum())
    size = rms * n ** 0.5
    if null >= count:
        g = torch.Generator().manual_seed(seed)
        mix, _ = torch.linalg.qr(torch.randn(null, count, generator=g, dtype=torch.float64))
        u = (vec[:, :null] @ mix).T
    else:
        u = vec[:, :count].T
        pair = max((lam[j] + lam[k]).item() for j in range(count) for k in range(j + 1, count))
        size = min(size, visible * sigma / pair ** 0.5)
    details = size * u.reshape(count, *shape)
    seen = forward(details)
    gaps = [(details[j] - details[k]).norm().item() for j in range(count) for k in range(j + 1, count)]
    leaks = [(seen[j] - seen[k]).norm().item() / sigma for j in range(count) for k in range(j + 1, count)]
    return details, {"null_dims": null, "latent_dims": n, "separation": min(gaps), "visibility_over_sigma": max(leaks),
                     "kind": "null space" if null >= count else "weakest directions"}


def grid_prior(op, image_size, sigma, images=IMAGES, std=0.01, beta=5.0, min_separation=20.0):
    """(prior, info, gram): components μ_(i,k) = encode(x_i) + δ_k (index i·K + k, caption of image k), with the
    hidden details of `hidden_details`, and MᵀM. s = min(std, separation / min_separation), so that details
    the measurement barely hides (blur) are still ≥ min_separation·s apart and "landed in k" is well defined."""
    if image_size > 128:
        raise ConfigError(f"--image_size {image_size}: the benchmark forms MᵀM densely; use at most 128")
    captions = yaml.safe_load((SAMPLES / "captions.yaml").read_text())
    x = torch.cat([load_image(SAMPLES / name, image_size) for name in images]).double()
    base = AnalyticPrior(["base"], means=torch.zeros(1, 4, 1, 1))
    mu = base.encode(x)
    gram, forward, _ = latent_gram(base, op, mu.shape[1:])
    details, info = hidden_details(gram, forward, mu.shape[1:], sigma, len(images))
    means = (mu[:, None] + details[None]).flatten(0, 1)
    std = min(std, info["separation"] / min_separation)
    names = [captions[name] for name in images]
    prior = AnalyticPrior([names[k] for _ in images for k in range(len(images))], means=means, std=std, beta=beta)
    return prior, {**info, "std": std, "separation_over_std": info["separation"] / std, "captions": names,
                   "details": [Path(name).stem for name in images]}, gram


# ----------------------------------------------------------------------- the accuracy bed (one task of the grid)
NULL_PROMPT = "out of focus, depth of field"
SETTINGS = ("w=0", "true", "other")
ACCURACY_SUPPORT = 1e-3  # posterior weight below which a landing is "off" (inconsistent with y)


def accuracy_config(name, setting, args):
    """The accuracy bed's config of solver `name`: its YAML with --steps, --set and the setting's cfg_guidance."""
    sets = {k.split(".", 1)[1]: v for k, v in args.set.items() if k.split(".", 1)[0] == name}
    _, cfg = configure(name, args.steps, overrides=sets)
    if hasattr(cfg, "cfg_guidance"):
        if setting == "w=0":
            w = 0.0
        else:
            w = args.cfg_guidance if args.cfg_guidance is not None else max(cfg.cfg_guidance, 1.0)
        cfg = dataclasses.replace(cfg, cfg_guidance=w)
    return cfg


def prompts_for(setting, k_true, captions):
    if setting == "w=0":
        return NULL_PROMPT
    return captions[k_true if setting == "true" else (k_true + 1) % len(captions)]


def accuracy_task(task_name, args, bar):
    """Every (setting, solver) of one task on the hidden-detail grid (`python -m treg bench accuracy --help`):
    (rows, runs, info)."""
    task = load_task(CONFIGS / f"task/{task_name}.yaml", args.image_size)
    op = build_operator(task.operator, task.image_size, **task.params)
    sigma = task.noise_scale
    prior, info, gram = grid_prior(op, task.image_size, sigma)
    captions = info["captions"]
    kk = len(captions)
    h = task.image_size // prior.vae_scale_factor
    mu = prior.means(h, h)

    seeds = list(range(args.seed, args.seed + args.seeds))
    truth = [j % kk for j in range(len(seeds))]  # seed j measures image j mod K with its own detail
    x = prior.decode(torch.stack([mu[t * kk + t] for t in truth])).float()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    y = measure(op, x, sigma, gens)
    after_y = [g.get_state() for g in gens]
    floor = sigma * y[0].numel() ** 0.5
    uc = prior.embed([NULL_PROMPT])

    rows, runs = [], []
    for setting in SETTINGS:
        prompts = [prompts_for(setting, t, captions) for t in truth]
        c = prior.embed(prompts)
        posts = [dense_posterior(prior, op, gram, y[j:j + 1], prompts[j], sigma) for j in range(len(seeds))]
        weights = torch.stack([p.log_weights.exp().float() for p in posts])  # (N, K²)
        if setting == "w=0":
            target = [None] * len(seeds)
        else:  # the component with the prompt's caption that the exact posterior weighs most
            target = [max((i for i, cap in enumerate(prior.captions) if cap == prompts[j]), key=lambda i: weights[j, i])
                      for j in range(len(seeds))]
        for name in args.solvers:
            bar.set_description(f"{task_name} {setting} {name}")
            row = {"task": task_name, "setting": setting, "solver": name}
            try:
                cfg = accuracy_config(name, setting, args)
                cfg = with_noise(cfg, sigma)  # ΠGDM and DDRM: the noise y really has
                row["cfg_guidance"] = getattr(cfg, "cfg_guidance", None)
                for g, state in zip(gens, after_y):
                    g.set_state(state)
                profiler = Profiler("cpu")
                begin = time.perf_counter()
                x_hat = SOLVERS[name][0](profiler.wrap(prior, PRIOR_PARTS), op, y, cfg, c=c, uc=uc, generator=gens)
                wall = time.perf_counter() - begin
                nfe = profiler.report(wall, len(seeds))["nfe"]
                wall /= len(seeds)
                if not torch.isfinite(x_hat).all():
                    raise FloatingPointError("non-finite solution")
            except Exception as err:  # one failing solver is a table entry, not the end of the benchmark
                first = str(err).splitlines()[0][:120] if str(err) else ""
                rows.append({**row, "error": f"{type(err).__name__}: {first}"})
                bar.update()
                continue
            residual = (residual_norm(op, y, x_hat) / floor).tolist()
            for j in range(len(seeds)):
                k, w = landed_component(prior, x_hat[j:j + 1], posts[j])
                k, w = k.item(), w.item()
                m = posts[j].means[k]
                z = prior.encode(x_hat[j:j + 1]).double()[0]
                runs.append({**row, "seed": seeds[j], "truth": truth[j], "prompt": prompts[j],
                             "residual": residual[j], "landed": k, "landed_caption": prior.captions[k],
                             "posterior_weight": w, "prompted": target[j],
                             "hit": None if target[j] is None else k == target[j],
                             "rel_l2": ((z - m).norm() / m.norm()).item(),
                             "posterior_weights": [round(v, 6) for v in weights[j].tolist()]})
            mine = runs[-len(seeds):]
            detail = dict(zip(captions, info["details"]))  # caption → short name (the image's stem)
            expected = {detail[cap]: sum(weights[j, i].item() for j in range(len(seeds)) for i, cp in
                                         enumerate(prior.captions) if cp == cap) for cap in captions}
            counts = {detail[cap]: sum(r["landed_caption"] == cap and r["posterior_weight"] >= ACCURACY_SUPPORT
                                       for r in mine)
                      for cap in captions}
            counts["off"] = sum(r["posterior_weight"] < ACCURACY_SUPPORT for r in mine)
            row |= {"residual": _mean(r["residual"] for r in mine), "residual_max": max(r["residual"] for r in mine),
                    "prompt_accuracy": None if setting == "w=0" else _mean(r["hit"] for r in mine),
                    "landed": counts, "expected": expected,
                    "posterior_weight": _mean(r["posterior_weight"] for r in mine),
                    "rel_l2": _mean(r["rel_l2"] for r in mine), "nfe": nfe,
                    "seconds": wall, "seeds": len(seeds)}
            rows.append(row)
            bar.update()
    return rows, runs, info | {"noise_scale": sigma, "image_size": task.image_size}


def _mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values)
