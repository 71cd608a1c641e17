"""TDS-SVD (treg.solvers.particles.tds_svd) against independent constructions: every step replayed with dense
Gaussians in the latent space (no spectral basis but for mapping the same noise); on a Gaussian prior, flat weights
and draws from the exact posterior of its chain; the calibration bed; batch independence and plumbing."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom, chi2

from test_particles import two_component_problem
from treg.bench import beds as cal, calibration as bench, particles as particles_bench
from treg.config import ConfigError, load_solver
from treg.diffusion import schedule
from treg.latent_ops import latent_operator
from treg.operators import build_operator
from treg.priors.analytic import AnalyticPrior
from treg.priors.pixel import AnalyticPixelPrior
from treg.solvers import SOLVERS, with_noise
from treg.solvers.particles import TDSSVDConfig, tds_svd, tweedie_variance

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

# Known-wrong TDS-SVDs, each one expression of tds_svd's source replaced (beds.patched_copy). Not here: the sign of
# p/q's −½log(P·v), the same for every particle of a measurement, so no normalised weight can see it.
KNOWN_WRONG = {
    "plain-ddpm-kernel": ("v = tilde + gain_z0 ** 2 * tweedie_variance(a, cfg.tausq)[0]", "v = tilde + 1e-12"),
    "half-kernel-correction": ("v = tilde + gain_z0 ** 2 *", "v = tilde + 0.5 * gain_z0 ** 2 *"),
    "no-clean-step": ("plan[-1] = (*plan[-1][:2], 1.0)", "pass"),
    "twist-without-c": ("r = cfg.sigma_y ** 2 + variance * s ** 2", "r = cfg.sigma_y ** 2 + 0 * variance * s ** 2"),
    "no-resampling": ("if resampled.any():", "if False:"),
    "proposal-ignores-y": ("precision = torch.where(measured, 1 / v + (s * g_next) ** 2 / r",
                           "precision = torch.where(measured, 1 / v + 0 * (s * g_next) ** 2 / r"),
}


def test_yaml_spells_out_the_defaults_and_unsupported_problems_are_config_errors(tiny_prior):
    loaded, cfg = load_solver(ROOT / "configs/solver/tds-svd.yaml", SOLVERS)
    assert loaded == "tds-svd" and cfg == TDSSVDConfig() and SOLVERS["tds-svd"] == (tds_svd, TDSSVDConfig)
    assert cfg.sigma_y is None and with_noise(cfg, 0.05).sigma_y == 0.05
    prior = AnalyticPrior.from_folder()
    op = build_operator("super_resolution", 16, scale=4)
    y = op.A(torch.zeros(1, 3, 16, 16))
    e = prior.embed([""])
    for sigma_y, message in ((None, "sigma_y is not set"), (0.0, "sigma_y must be > 0")):
        with pytest.raises(ConfigError, match=f"^tds-svd: {message}"):
            tds_svd(prior, op, y, TDSSVDConfig(sigma_y=sigma_y), c=e, uc=e)
    motion = build_operator("blur", 16, kernel="motion", kernel_size=5, intensity=0.5, seed=0)
    pixel = AnalyticPixelPrior.from_folder()
    for p, o in ((tiny_prior, op), (pixel, motion)):
        with pytest.raises(ConfigError, match="needs the SVD of A∘decode"):
            tds_svd(p, o, o.A(torch.zeros(1, 3, 16, 16)), TDSSVDConfig(sigma_y=0.1, steps=2), c=p.embed([""]),
                    uc=p.embed([""]))


def dense_log_normal(x, mean, cov):
    """log N(x; mean, cov) for rows x (P, d), written out with a Cholesky factor."""
    chol = torch.linalg.cholesky(cov)
    u = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False).T
    return -0.5 * u.pow(2).sum(1) - torch.log(torch.diagonal(chol)).sum() - 0.5 * len(cov) * math.log(2 * math.pi)


def replay_errors(fn, n=4, steps=4, w=2.0, sigma_y=0.05, tausq=0.12, threshold=0.7):
    """A TDS-SVD solve by `fn` (2 measurements, n particles, float64, the 2-component latent problem of
    test_particles) against every step written out in the latent space with dense matrices: the twist
    N(y; M ẑ0, σ_y²I + c(ᾱ)MMᵀ) over all 12 measurements (c, g = tweedie_variance), the kernel N(μ, (β̃ + b²c)I), the
    proposal as the dense Gaussian conditional of z' on y with ẑ0(z') ≈ ẑ0 + g'(z' − μ), its log-density, systematic
    resampling by a loop, the clean level's exact likelihood and the returned particle. The solver's V maps its
    spectral noise ξ to Vξ, which the replay scales by the symmetric P^(−1/2) (independent of the basis). Log-weights
    are compared normalised (the spectral twist drops y's part outside range(M), a constant per measurement).
    Returns (largest relative error, {(step, measurement): resampled})."""
    prior, op, M, y, uc, c = two_component_problem()
    cfg = TDSSVDConfig(particles=n, steps=steps, cfg_guidance=w, sigma_y=sigma_y, tausq=tausq,
                       resample_threshold=threshold)
    seen = []
    out = fn(prior, op, y, cfg, c=c, uc=uc, generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
             callback=seen.append)
    basis = latent_operator(prior, op, torch.zeros(1, 4, 1, 1, dtype=torch.float64)).svd(None).V

    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    draw = lambda: torch.cat([torch.randn((1, n, 4), generator=g).double() for g in gens]).view(2, n, 4)
    uniforms = lambda: torch.cat([torch.rand((1, 1), generator=g).double() for g in gens])
    z = draw()
    ys = y.flatten(1)  # (2, 12)
    eye = torch.eye(4, dtype=torch.float64)
    rel = lambda mine, theirs: ((theirs.double() - mine).norm() / mine.norm()).item()
    normed = lambda lw: lw - torch.logsumexp(lw, 1, keepdim=True)
    errors, resampled, log_w, prev = [], {}, torch.zeros(2, n, dtype=torch.float64), None

    def twist(z0, a):
        cov = sigma_y ** 2 * torch.eye(12, dtype=torch.float64) + tweedie_variance(a, tausq)[0] * M @ M.T
        return torch.stack([dense_log_normal(z0[b] @ M.T, ys[b], cov) for b in range(2)])

    plan = schedule(prior.alphas_cumprod, steps, official_shift=False)
    plan[-1] = (plan[-1][0], plan[-1][1], 1.0)
    for i, (t, a, a_prev) in enumerate(plan):
        flat = z.reshape(2 * n, 4, 1, 1)
        eps = prior.eps(flat, t, uc) + w * (prior.eps(flat, t, c) - prior.eps(flat, t, uc))
        z0 = ((flat - (1 - a) ** 0.5 * eps) / a ** 0.5).view(2, n, 4)
        tw = twist(z0, a)
        log_w = log_w + tw - (prev if i else 0)
        errors += [rel(z.reshape(2 * n, 4), seen[i]["z"].flatten(1)), rel(normed(log_w), normed(seen[i]["log_w"]))]
        ess = log_w.exp().sum(1) ** 2 / (2 * log_w).exp().sum(1)
        errors.append(rel(ess, seen[i]["ess"]))
        u = uniforms()
        for b in range(2):
            resampled[i, b] = bool(ess[b] < threshold * n)
            if resampled[i, b]:
                cdf = torch.cumsum(torch.softmax(log_w[b], 0), 0)
                idx = [min(next((j for j in range(n) if cdf[j] >= (u[b, 0] + k) / n), n - 1), n - 1)
                       for k in range(n)]
                z[b], z0[b], tw[b] = z[b, idx], z0[b, idx], tw[b, idx]
                log_w[b] = 0
        beta = 1 - a / a_prev
        b0 = a_prev ** 0.5 * beta / (1 - a)
        mean = b0 * z0 + (a / a_prev) ** 0.5 * (1 - a_prev) / (1 - a) * z
        v = beta * (1 - a_prev) / (1 - a) + b0 ** 2 * tweedie_variance(a, tausq)[0]
        c_next, g_next = tweedie_variance(a_prev, tausq)
        r_inv = torch.linalg.inv(sigma_y ** 2 * torch.eye(12, dtype=torch.float64) + c_next * M @ M.T)
        precision = eye / v + g_next ** 2 * M.T @ r_inv @ M
        lam, vec = torch.linalg.eigh(precision)
        root = vec @ torch.diag(lam ** -0.5) @ vec.T
        cov = torch.linalg.inv(precision)
        z_new, log_pq = torch.empty_like(z), torch.empty(2, n, dtype=torch.float64)
        xi = basis(draw().reshape(2 * n, 4)).reshape(2, n, 4)
        for b in range(2):
            shifted = ys[b] - (z0[b] - g_next * mean[b]) @ M.T  # y − M(ẑ0 − g'μ)
            mu = (mean[b] / v + g_next * shifted @ r_inv @ M) @ cov
            z_new[b] = mu + xi[b] @ root
            log_pq[b] = dense_log_normal(z_new[b], mean[b], v * eye) - dense_log_normal(z_new[b], mu, cov)
        z, log_w, prev = z_new, log_w + log_pq, tw
    clean = z
    log_w = log_w + torch.stack([dense_log_normal(clean[b] @ M.T, ys[b], sigma_y ** 2 * torch.eye(12,
                                                                                                dtype=torch.float64))
                                 for b in range(2)]) - prev
    errors += [rel(normed(log_w), normed(seen[-1]["log_w"])),
               rel(log_w.exp().sum(1) ** 2 / (2 * log_w).exp().sum(1), seen[-1]["ess"])]
    u = uniforms()
    cdf = torch.cumsum(torch.softmax(log_w, 1), 1)
    pick = [min(int((cdf[b] < u[b, 0]).sum()), n - 1) for b in range(2)]
    errors.append(rel(prior.decode(torch.stack([clean[b, pick[b]] for b in range(2)]).view(2, 4, 1, 1)), out))
    assert len(seen) == steps + 1 and out.dtype == torch.float64
    return max(errors), resampled


def test_tds_svd_replays_every_step_with_dense_gaussians():
    """Particles, normalised log-weights, ESS and the output agree with `replay_errors` to 1e-10 relative (y is
    float64, so are the particles); at threshold 0.7·N both resampling branches are taken."""
    error, resampled = replay_errors(tds_svd)
    assert error < 1e-10, error
    assert any(resampled.values()) and not all(resampled.values()), resampled


@pytest.mark.parametrize("name", list(KNOWN_WRONG))
def test_the_replay_catches_each_known_wrong_tds_svd(name):
    error, _ = replay_errors(cal.patched_copy(tds_svd, *KNOWN_WRONG[name]))
    assert error > 1e-4, error


def gaussian_problem(std=0.1, sigma=0.05):
    """A one-component analytic latent prior N(μ, std²I) on a 4×1×1 latent (8 px), ×8 SR (3 measurements, rank 3:
    one null direction); and the exact posterior of TDS-SVD's target under it. With τ² = std² its kernels are the
    true reverse kernels, so the chain's z_0 given z_T is N(μ + g_T(z_T − √ᾱ_T μ), c_T) and from z_T ~ N(0, I)
    p_chain(z_0) = N((1 − g_T√ᾱ_T)μ, (c_T + g_T²)I); with y, N(P(m/q + Mᵀy/σ²), P), P = (I/q + MᵀM/σ²)⁻¹."""
    mu = torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=torch.float64).view(1, 4, 1, 1)
    prior = AnalyticPrior(["x"], means=mu, std=std)
    op = build_operator("super_resolution", 8, scale=8).double()
    M = op.A(prior.decode(torch.eye(4, dtype=torch.float64).view(4, 4, 1, 1))).flatten(1).T  # (3, 4)
    y = (M @ torch.tensor([0.6, -0.1, 0.0, 0.3], dtype=torch.float64)).view(1, 3, 1, 1)
    a_top = schedule(prior.alphas_cumprod, 10, official_shift=False)[0][1]
    c_top, g_top = tweedie_variance(a_top, std ** 2)
    m, q = (1 - g_top * a_top ** 0.5) * mu.flatten(), c_top + g_top ** 2
    cov = torch.linalg.inv(torch.eye(4, dtype=torch.float64) / q + M.T @ M / sigma ** 2)
    return prior, op, y, sigma, cov @ (m / q + M.T @ y.flatten() / sigma ** 2), cov


def test_on_a_gaussian_prior_the_weights_stay_flat_and_one_particle_is_an_exact_draw():
    """τ² = the prior's variance: the proposal is the exact conditional and the twist the exact p(y | z_t), so after
    the first resampling every log-weight increment is 0 (spread < 1e-9 at every later level, seen 1e-13), and
    N = 1 already samples the posterior of the chain (`gaussian_problem`; z_T's own information from y, ignored by
    the N(0, I) start, is ~1e-6 of a posterior variance): 400 draws pass two-sided χ² tests at level 1e-4 each on the
    whitened mean (χ²_4) and the sum of squares (χ²_1600); false failure ≤ 2e-4. Seen: a kernel with half the b²c
    term fails the mean test (R‖ū‖²/4 in 81–107 over seeds 0–2, against ≤ 6.25; the right kernel 0.43–1.32)."""
    prior, op, y, sigma, mean, cov = gaussian_problem()
    e = torch.zeros(1, 1, 768, dtype=torch.float64)  # one component: its weight is 1 whatever the text
    seen = []
    cfg = TDSSVDConfig(particles=8, steps=10, sigma_y=sigma, tausq=prior.std ** 2)
    tds_svd(prior, op, y.expand(3, -1, -1, -1), cfg, c=e, uc=e, generator=torch.Generator().manual_seed(0),
            callback=seen.append)
    spreads = [(info["log_w"].max(1).values - info["log_w"].min(1).values).max().item() for info in seen]
    assert spreads[0] > 1e-6 and max(spreads[2:]) < 1e-9, spreads  # level 0 differs; after its resampling, flat
    runs = 400
    x = tds_svd(prior, op, y.expand(runs, -1, -1, -1), dataclasses.replace(cfg, particles=1), c=e, uc=e,
                generator=torch.Generator().manual_seed(1))
    u = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), (prior.encode(x).flatten(1) - mean).T,
                                      upper=False).T
    t_mean, t_sum = runs * u.mean(0).pow(2).sum().item(), u.pow(2).sum().item()
    lo_mean, hi_mean = chi2.ppf([5e-5, 1 - 5e-5], 4)
    lo_sum, hi_sum = chi2.ppf([5e-5, 1 - 5e-5], 4 * runs)
    assert lo_mean <= t_mean <= hi_mean and lo_sum <= t_sum <= hi_sum, (t_mean, t_sum)


def bed_misses(bed, ex, z):
    """The checks of the calibration-bed test that z (len(ex.seeds), 4, 8, 8) at w = 0 misses, as readable strings.
    Bounds: the spreads of 128 exact posterior draws vary with sd 0.009 (measured) and 0.013 (null), their mean
    residual with sd 0.0034 and its W1 is 0.005 ± 0.0015 (cal.statistics on 40 sets of 128 bed.exact_draws); the
    main-mode count has the binomial interval of level 1 − 1e-3 at the exact 0.6."""
    n = len(ex.seeds)
    log_w, reference = ex.target("", 0.0)
    weights = log_w.exp().numpy()
    fns, _ = cal.statistics(bed, z, log_w, reference)
    every = np.arange(n)
    landed = ex.landed(z)
    low, high = binom.ppf(5e-4, n, weights.max()), binom.isf(5e-4, n, weights.max())
    checks = {"support": (weights[landed] >= cal.SUPPORT).all(),
              "main mode": low <= (landed == weights.argmax()).sum() <= high,
              "spread measured": abs(fns["spread_measured"](every) - 1) < 0.05,
              "spread null": abs(fns["spread_null"](every) - 1) < 0.07,
              "residual": abs(bed.residuals(z).mean().item() - reference.mean()) < 0.02,
              "residual W1": fns["residual_w1"](every) < 0.015}
    return [name for name, ok in checks.items() if not ok]


def test_tds_svd_samples_the_exact_posterior_of_the_calibration_bed():
    """128 seeds, N = 8, 20 steps, w = 0, the YAML's τ² = 0.01: every statistic of the returned particles lies
    where 128 exact posterior draws put it (bed_misses; each bound ≥ 5 of the exact draws' sd). Measured: main mode
    83/128, spreads 0.987 / 1.002, residual 0.983 (exact 0.988), W1 0.006; seeds 500–627: 87, 0.999 / 1.014, 0.989,
    0.004. Known wrong, each missing: τ² 0.1 (the bed prior's total variance: null spread 2.89), the plain DDPM
    kernel (no b²c term: 5.18 / 0.27) and half that term (1.06 / 0.63). Not seen here, as they should not be: a twist
    without c and no resampling change only the sampler's efficiency (main mode 86 and 65 of 128; the replay test
    catches them)."""
    bed = cal.build_bed(ROOT)
    ex = bench.Experiment(bed, list(range(128)))
    cfg = dataclasses.replace(bench.solver_config("tds-svd", 20, 0.0), particles=8)
    assert cfg.tausq == 0.01
    assert bed_misses(bed, ex, ex.solve(tds_svd, cfg, "")[0]) == []
    wrong = {"tausq 0.1": (tds_svd, dataclasses.replace(cfg, tausq=0.1))}
    wrong |= {name: (cal.patched_copy(tds_svd, *KNOWN_WRONG[name]), cfg)
              for name in ("plain-ddpm-kernel", "half-kernel-correction")}
    for name, (fn, wrong_cfg) in wrong.items():
        assert bed_misses(bed, ex, ex.solve(fn, wrong_cfg, "")[0]), name


def test_each_measurement_is_solved_as_if_alone_and_pixel_priors_run():
    """A batch of two equals two single solves (float64, to rounding), ESS and resampling counts included; on the
    analytic pixel prior (×8 SR at 64 px, through the operator's own SVD) the output is finite and N·steps noise
    predictions are made per image."""
    prior, op, _, y, uc, c = two_component_problem()
    cfg = TDSSVDConfig(particles=8, steps=4, cfg_guidance=2.0, sigma_y=0.05, resample_threshold=0.5)
    seen = []
    both = tds_svd(prior, op, y, cfg, c=c, uc=uc, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                   callback=seen.append)
    for b, s in enumerate((3, 4)):
        alone = []
        one = tds_svd(prior, op, y[b:b + 1], cfg, c=c, uc=uc, generator=[torch.Generator().manual_seed(s)],
                      callback=alone.append)
        torch.testing.assert_close(one, both[b:b + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(alone[-1]["ess"], seen[-1]["ess"][b:b + 1], rtol=1e-10, atol=0)
        assert torch.equal(alone[-1]["resamples"], seen[-1]["resamples"][b:b + 1])
    pixel = AnalyticPixelPrior.from_folder()
    op = build_operator("super_resolution", 64, scale=8)
    y = op.A(torch.zeros(1, 3, 64, 64)) + 0.1
    calls = []
    eps = pixel.eps
    pixel.eps = lambda z, t, e, eps=eps: calls.append(len(z)) or eps(z, t, e)
    try:
        uc, c = pixel.embed(["", "a photo of a cat"]).chunk(2)
        x = tds_svd(pixel, op, y, TDSSVDConfig(particles=2, steps=2, cfg_guidance=3.0, sigma_y=0.05), c=c, uc=uc,
                    generator=torch.Generator().manual_seed(0))
    finally:
        del pixel.eps
    assert x.shape == (1, 3, 64, 64) and torch.isfinite(x).all() and calls == [4, 4]


def test_bench_particles_runs_tds_svd(tmp_path, capsys, monkeypatch):
    """`--solver tds-svd`: the report names it and its YAML, NFE = N·steps, the final ESS of each seed in [1, N];
    a --set for the other sampler is a one-line error that writes nothing."""
    monkeypatch.setattr(bench, "CFG_DRAWS", 50)
    monkeypatch.setattr(bench, "CFG_STEPS", 6)
    out = tmp_path / "p"
    particles_bench.main(["--solver", "tds-svd", "--particles", "1,3", "--seeds", "4", "--particle_budget", "9",
                          "--steps", "3", "--guidance", "0", "--set", "tds-svd.tausq=0.1", "--out", str(out)])
    table = (tmp_path / "p.md").read_text()
    assert table == capsys.readouterr().out and table.startswith("# tds-svd convergence")
    assert "configs/solver/tds-svd.yaml (τ² = 0.1" in table and "--solver tds-svd" in table
    rows = {r["particles"]: r for r in json.loads((tmp_path / "p.json").read_text())["rows"]}
    assert rows[3]["solver"] == "tds-svd" and rows[3]["nfe"] == 9 and rows[1]["nfe"] == 3
    assert all(1 - 1e-9 <= e <= 3 + 1e-9 for e in rows[3]["runs"]["ess"])
    with pytest.raises(SystemExit) as exit_info:
        particles_bench.main(["--solver", "tds-svd", "--set", "tds.tausq=0.1", "--out", str(tmp_path / "q")])
    assert "only tds-svd.KEY" in str(exit_info.value.code)
    assert not list(tmp_path.glob("q*"))
