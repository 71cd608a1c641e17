"""The calibration bed against independent constructions, its statistics on inputs with known answers, the
sensitivity check catching every known-wrong variant (applied by monkeypatching), and the benchmark end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from treg.bench import beds as cal, calibration as bench
from treg.bench.flags import TEST_SEEDS
from treg.priors.posterior import dense_posterior, exact_posterior, sample
from treg.solvers import SOLVERS
from treg.solvers.latent import residual_norm

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bed():
    return cal.build_bed(ROOT)


def test_bed_posterior_agrees_with_the_cg_posterior(bed):
    """Dense means, weights and covariance (eigenbasis of MᵀM) against treg.priors.posterior's matrix-free CG
    version."""
    cg = exact_posterior(bed.prior, bed.op, bed.y, "", bed.sigma)
    torch.testing.assert_close(bed.means, cg.means.flatten(1), rtol=0, atol=1e-9)
    weights = bed.tilted_log_weights("", 0.0).exp()
    torch.testing.assert_close(weights, cg.log_weights.exp(), rtol=0, atol=1e-9)
    torch.testing.assert_close(weights[:3], torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), rtol=0, atol=1e-6)
    assert weights[3] < 1e-9  # y rules the rocket out
    v = torch.randn(3, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dense = (v @ bed.basis) * bed.variance @ bed.basis.T  # Σ v
    torch.testing.assert_close(dense, cg.cov(v.view(3, *bed.latent_shape)).flatten(1), rtol=1e-7, atol=1e-12)
    assert int(bed.measured.sum()) == 192 and torch.allclose(bed.variance[~bed.measured], torch.tensor(cal.STD ** 2,
                                                                                      dtype=torch.float64))


def test_dense_posterior_takes_an_embedding_and_draws_as_the_cg_posterior(bed):
    """dense_posterior given the prompt's embedding equals it given the string; its cov is the eigenbasis Σ, and its
    draws equal the CG posterior's draws from the same generator (same weights, means, Σ and noise)."""
    prompt = "plain"
    dense = dense_posterior(bed.prior, bed.op, bed.gram, bed.y, prompt, bed.sigma)
    embedded = dense_posterior(bed.prior, bed.op, bed.gram, bed.y, bed.prior.embed([prompt]), bed.sigma)
    torch.testing.assert_close(embedded.log_weights, dense.log_weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(embedded.means, dense.means, rtol=0, atol=1e-12)
    v = torch.randn(3, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(dense.cov(v.view(3, *bed.latent_shape)).flatten(1),
                               (v @ bed.basis) * bed.variance @ bed.basis.T, rtol=1e-7, atol=1e-12)
    cg = exact_posterior(bed.prior, bed.op, bed.y, prompt, bed.sigma)
    draws = [sample(post, 8, torch.Generator().manual_seed(2)) for post in (dense, cg)]
    assert draws[0].shape == (8, *bed.latent_shape)
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=1e-6)
    nearest = torch.cdist(draws[0].flatten(1), dense.means.flatten(1)).min(1).values
    assert (nearest > 0.5 * bed.variance.sum().sqrt()).all()  # each draw is ≈ √tr Σ from its mean, not at it


def test_tilted_target_is_the_closed_form(bed):
    """π_uc^(1−w)·π_c^w with π_uc = π0: within the cat group, weights ∝ π0_k·exp(w·β·cos(plain, c_k))."""
    e = bed.prior.embed(["plain"]).mean(1)
    cos = torch.nn.functional.cosine_similarity(e, bed.prior.caption_embeddings, dim=-1).double()
    base = torch.tensor(cal.BASE_WEIGHTS, dtype=torch.float64)
    for w in (0.0, 1.0, 2.0, 5.0):
        expected = (base * torch.exp(w * cal.BETA * cos))[:3]
        torch.testing.assert_close(bed.tilted_log_weights("plain", w).exp()[:3], expected / expected.sum(),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(bed.tilted_log_weights("plain", 1.0), bed.posterior_log_weights("plain"), rtol=0,
                               atol=1e-9)  # w = 1 is the posterior under the prompt


def test_exact_draws_match_the_perturbation_sampler(bed):
    """Eigenbasis draws against treg.priors.posterior.sample (perturbation–optimisation by CG): landing frequencies,
    spread per subspace and residuals agree; both residual means sit near the noise floor."""
    n = 3000
    log_w = bed.tilted_log_weights("", 0.0)
    z, k = bed.exact_draws(log_w, n, torch.Generator().manual_seed(0))
    post = exact_posterior(bed.prior, bed.op, bed.y, "", bed.sigma)
    z_cg = sample(post, 200, torch.Generator().manual_seed(1))
    freq = torch.bincount(k, minlength=4) / n
    assert (freq - log_w.exp()).abs().max() < 0.03
    for draws in (z, z_cg):
        fns, runs = cal.statistics(bed, draws, log_w, bed.residuals(z).numpy())
        everyone = np.arange(len(draws))
        assert abs(fns["spread_null"](everyone) - 1) < 0.1 and abs(fns["spread_measured"](everyone) - 1) < 0.1
        assert set(runs["landed"]) <= {0, 1, 2}
    r, r_cg = bed.residuals(z), bed.residuals(z_cg)
    assert abs(r.mean() - r_cg.mean()) < 0.02 and 0.9 < r.mean() < 1.1
    x = bed.prior.decode(z_cg[:5].float())
    torch.testing.assert_close(bed.residuals(z_cg[:5]).float(), residual_norm(bed.op, bed.y, x) / (
        bed.sigma * bed.y.numel() ** 0.5), rtol=1e-4, atol=0)  # the dense M against the operator


@pytest.mark.parametrize("n", [7, 50, 64])
def test_wasserstein_matches_scipy(n):
    rng = np.random.default_rng(n)
    reference, sample_ = rng.gamma(2.0, size=320), rng.normal(2, 1, size=n)
    assert abs(cal.wasserstein(reference)(sample_) - wasserstein_distance(sample_, reference)) < 1e-12


def test_statistics_tell_collapse_and_over_dispersion_from_calibration(bed):
    """On exact draws every statistic reads "calibrated"; at the posterior means the spread collapses to 0 and the
    residual under-fits the exact distribution; doubled deviations read as 4× the variance."""
    log_w = bed.tilted_log_weights("", 0.0)
    z, k = bed.exact_draws(log_w, 400, torch.Generator().manual_seed(3))
    reference = bed.residuals(bed.exact_draws(log_w, 4000, torch.Generator().manual_seed(4))[0]).numpy()
    everyone = np.arange(400)
    fns, _ = cal.statistics(bed, z, log_w, reference)
    assert fns["tv"](everyone) < 0.1 and fns["residual_w1"](everyone) < 0.05 and fns["consistent"](everyone) == 1
    at_means, _ = cal.statistics(bed, bed.means[k].view_as(z), log_w, reference)
    assert at_means["spread_null"](everyone) == 0 and at_means["spread_measured"](everyone) == 0
    assert at_means["residual"](everyone) < 0.2 and at_means["residual_w1"](everyone) > 0.8
    wide = bed.means[k] + 2 * (z.flatten(1) - bed.means[k])
    doubled, _ = cal.statistics(bed, wide.view_as(z), log_w, reference)
    assert abs(doubled["spread_null"](everyone) / fns["spread_null"](everyone) - 4) < 0.1
    always_likeliest, _ = cal.statistics(bed, bed.means[[0] * 400].view_as(z), log_w, reference)
    assert abs(always_likeliest["tv"](everyone) - 0.4) < 1e-6  # ½(|1 − 0.6| + 0.3 + 0.1)
    value, low, high = cal.interval(fns["residual"], 400)
    assert low < value < high and high - low < 0.05


def test_patched_copy_replaces_exactly_one_expression():
    base, fn = cal.variant("psld-adjoint")
    assert base == "psld" and fn is not SOLVERS["psld"][0] and fn.__name__ == "psld"
    with pytest.raises(RuntimeError, match="exactly once"):
        cal.patched_copy(SOLVERS["treg"][0], "no such expression", "x")


@pytest.fixture(scope="module")
def sensitivity_runs(bed):
    """32 seeds at 50 steps, w = 0: every correct solver a variant patches, solved once."""
    ex = bench.Experiment(bed, list(range(TEST_SEEDS)))
    correct = {}
    for base in {v[0] for v in cal.VARIANTS.values()}:
        correct[base] = ex.solve(SOLVERS[base][0], bench.solver_config(base, 50, 0.0), "")[0]
    return ex, correct


def flags(ex, correct, wrong):
    pooled, _ = cal.statistics(ex.bed, torch.cat([correct, wrong]), *ex.target("", 0.0))
    return cal.flagged(cal.permutation_pvalues(pooled, len(ex.seeds)))


@pytest.mark.parametrize("name", list(cal.VARIANTS))
def test_sensitivity_flags_each_wrong_variant(sensitivity_runs, name, monkeypatch):
    """Each variant is monkeypatched into SOLVERS and solved through the benchmark's ordinary path: flagged by at
    least one statistic."""
    ex, correct = sensitivity_runs
    base, fn = cal.variant(name)
    monkeypatch.setitem(SOLVERS, base, (fn, SOLVERS[base][1]))
    wrong = ex.solve(SOLVERS[base][0], bench.solver_config(base, 50, 0.0), "")[0]
    assert flags(ex, correct[base], wrong), f"{name} not flagged"


def test_sensitivity_false_flag_rate_is_at_most_nominal(bed):
    """Under a genuine null (two independent cells of 32 exact draws, the test's seed count), 100 repeats of the
    flag rule: at most 10 flag. The rule is an exact permutation test with Bonferroni over 7 statistics, so each
    repeat flags with probability ≤ 5 % and P(≥ 11 of 100) ≤ 1.2 %; without the correction (≈ 25 % per repeat) or
    with a one-sided count (≈ 2× the flags) it fails. (The report measures the rate with 200 repeats.)"""
    log_w = bed.tilted_log_weights("", 0.0)
    reference = bed.residuals(bed.exact_draws(log_w, 1000, torch.Generator().manual_seed(4))[0]).numpy()
    generator, count = torch.Generator().manual_seed(7), 0
    for r in range(100):
        pooled, _ = cal.statistics(bed, bed.exact_draws(log_w, 64, generator)[0], log_w, reference)
        count += bool(cal.flagged(cal.permutation_pvalues(pooled, 32, seed=r, resamples=500)))
    assert count <= 10, count


def test_bench_calibration_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cal"
    monkeypatch.setattr(bench, "CFG_DRAWS", 50)
    monkeypatch.setattr(bench, "CFG_STEPS", 6)
    bench.main(["--solvers", "treg,ddim", "--seeds", "4", "--steps", "3,5", "--guidance", "0,2", "--main_steps", "3",
                "--variants", "control", "--sensitivity_steps", "3", "--null_repeats", "2", "--out", str(out)])
    table = (tmp_path / "cal.md").read_text()
    assert table == capsys.readouterr().out
    assert (tmp_path / "cal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "cal.json").read_text())
    assert [(r["steps"], r["solver"]) for r in report["calibration"]] == [("any", "exact")] + [
        (s, m) for s in (3, 5) for m in ("treg", "ddim")]
    assert [(r["w"], r["solver"]) for r in report["guidance"]] == [
        (w, m) for w in (0, 2) for m in ("exact", "exact CFG", "treg", "ddim")]
    assert [(r["prompt"], r["w"]) for r in report["cfg_laws"]] == [("plain", 0), ("plain", 2), ("rocket", 5)]
    assert [(r["n"], r["permutation"][1]) for r in report["false_flags"]] == [(4, 2), (TEST_SEEDS, 2)]
    rows = {(r["steps"], r["solver"]): r for r in report["calibration"]}
    assert rows[5, "ddim"]["nfe"] == 5 and rows[3, "treg"]["nfe"] == 3  # w = 0: one noise prediction per step
    assert rows[5, "treg"]["stats"]["residual"][0] < rows[5, "ddim"]["stats"]["residual"][0]  # ddim ignores y
    value, low, high = rows[5, "treg"]["stats"]["tv"]
    assert 0 <= low <= high <= 1 and len(rows[5, "treg"]["runs"]["residual"]) == 4
    assert report["sensitivity"][0]["variant"] == "control" and "flagged_by" in report["sensitivity"][0]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setitem(SOLVERS, "ddim", (broken, SOLVERS["ddim"][1]))
    bench.main(["--solvers", "ddim", "--seeds", "2", "--steps", "3", "--guidance", "0", "--main_steps", "3",
                "--variants", "", "--out", str(out)])
    report = json.loads((tmp_path / "cal.json").read_text())
    assert [r.get("error") for r in report["calibration"]] == [None, "RuntimeError: boom"]
    assert "error: RuntimeError: boom" in (tmp_path / "cal.md").read_text()


@pytest.mark.parametrize("argv, message", [(["--solvers", "nope"], "unknown nope"),
                                           (["--variants", "nope"], "unknown nope"),
                                           (["--seeds", "1"], "at least 2"),
                                           (["--steps", "0"], "in [1, 1000]"),
                                           (["--steps", "x"], "invalid int_list"),
                                           (["--solvers", "cci", "--set", "treg.steps=3"], "not a selected solver"),
                                           (["--solvers", "cci", "--set", "cci.k_strt=9"], "does not apply"),
                                           (["--solvers", "cci", "--set", "cci.k_start=5000"], "[1, 999]")])
def test_bad_arguments_are_one_line_errors(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--out", str(tmp_path / "cal")])
    assert exit_info.value.code != 0
    assert message in str(exit_info.value.code) + capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_noise_aware_solvers_get_the_beds_noise():
    """CCI, ΠGDM and DDRM model y's noise: the benchmark gives them the task's σ_y, as solve.py does; a YAML name
    runs the solver it names with its own settings (cci-noiseless: cci with σ_y = 0)."""
    from treg.bench.calibration import solver_config, solver_of
    for name in ("cci", "pigdm", "ddrm"):
        cfg = solver_config(name, 5, 0.0)
        assert cfg.sigma_y == 0.01 and cfg.steps == 5 and cfg.cfg_guidance == 0.0
        assert solver_of(name) is SOLVERS[name][0]
    assert solver_of("cci-noiseless") is SOLVERS["cci"][0] and solver_config("cci-noiseless", 5, 0.0).sigma_y == 0
    assert solver_config("cci", 5, 0.0, [("cci.k_start", 999), ("treg.steps", 3)]).k_start == 999  # --set


def test_interval_is_the_percentile_bootstrap():
    """Against a bootstrap written out with NumPy (the same resamples) and scipy.stats.bootstrap's percentile
    interval (its own resamples: agreement to Monte-Carlo error), at two levels."""
    from scipy.stats import bootstrap
    data = np.random.default_rng(1).gamma(2.0, size=40)
    for level in (0.95, 0.8):
        value, low, high = cal.interval(lambda i: data[i].mean(-1), 40, seed=3, level=level)
        rng = np.random.default_rng(3)
        means = [data[rng.integers(0, 40, 40)].mean() for _ in range(cal.BOOTSTRAP)]
        alpha = 100 * (1 - level) / 2
        assert (value, low, high) == (data.mean(), *np.percentile(means, [alpha, 100 - alpha]))
        ref = bootstrap((data,), np.mean, confidence_level=level, method="percentile", n_resamples=20000,
                        random_state=0).confidence_interval
        assert abs(low - ref.low) < 0.06 and abs(high - ref.high) < 0.06
    assert cal.interval(lambda i: np.full(i.shape[:-1], np.nan), 5) [1:] == (pytest.approx(np.nan, nan_ok=True),) * 2


def test_paired_differences_are_bonferroni_corrected_bootstrap_intervals():
    """Each statistic's interval of (variant − correct) on joint resamples at level 1 − 0.05/7."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=30), rng.normal(0.3, 1, size=30)
    correct = {name: (lambda i: a[i].mean(-1)) for name in cal.TESTED}
    wrong = {name: (lambda i: b[i].mean(-1)) for name in cal.TESTED}
    out = cal.paired_differences(correct | {"landed_x": None}, wrong | {"landed_x": None}, 30, seed=5)
    assert list(out) == list(cal.TESTED)
    r = np.random.default_rng(5)
    d = [(b[i] - a[i]).mean() for i in (r.integers(0, 30, 30) for _ in range(cal.PAIRED_BOOTSTRAP))]
    expected = ((b - a).mean(), *np.percentile(d, [100 * 0.05 / 7 / 2, 100 - 100 * 0.05 / 7 / 2]))
    assert out["tv"] == pytest.approx(expected, abs=1e-12)
    assert cal.bootstrap_flags({"x": (1, 0.1, 2), "y": (-1, -2, -0.1), "z": (0, -1, 1), "w": (0, 0, 1)}) == ["x", "y"]


def test_permutation_pvalues_enumerate_the_sign_flips():
    """On 8 seeds against every one of the 2⁸ sign patterns enumerated (its exact p-value; random flips agree to
    Monte-Carlo error), for a mean and a non-linear statistic; p = (1 + #{|permuted| ≥ |observed|})/(1 + R)."""
    from itertools import product
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.normal(size=8), rng.normal(0.8, 1, size=8)])  # correct 0..7, variant 8..15
    stats = {"residual": lambda i: values[i].mean(-1), "spread_null": lambda i: np.abs(values[i]).max(-1)}
    pooled = {name: stats.get(name, lambda i: np.zeros(i.shape[:-1])) for name in cal.TESTED}
    got = cal.permutation_pvalues(pooled, 8, seed=1, resamples=20000)
    for name, f in stats.items():
        observed, exceed = abs(f(np.arange(8, 16)) - f(np.arange(8))), 0
        for signs in product((0, 1), repeat=8):
            s = np.array(signs)
            exceed += abs(f(np.arange(8) + 8 * (1 - s)) - f(np.arange(8) + 8 * s)) >= observed - 1e-12
        assert abs(got[name] - exceed / 256) < 0.01, (name, got[name], exceed / 256)
    assert got["tv"] == 1.0  # a statistic that never differs: every flip ties
    few = cal.permutation_pvalues(pooled, 8, seed=1, resamples=3)
    assert few["tv"] == 1.0 and few["residual"] in (0.25, 0.5, 0.75, 1.0)


def test_flagged_is_bonferroni_at_the_familywise_level():
    threshold = cal.FAMILY_LEVEL / len(cal.TESTED)
    pvalues = dict(zip(cal.TESTED, [0.5, threshold * 1.01, threshold, 1e-4, 0.2, 0.9, 1.0]))
    assert list(cal.flagged(pvalues).items()) == [("residual", 1e-4), ("spread_null", threshold)]
    assert cal.flagged(pvalues, level=0.5) == {k: v for k, v in sorted(pvalues.items(), key=lambda kv: kv[1])
                                              if v <= 0.5 / 7}
    assert cal.FAMILY_LEVEL == 0.05 and len(cal.TESTED) == 7


def test_spread_estimator_is_the_unbiased_pooled_variance():
    """squared_spread/spread_ratio against np.var(ddof=1) per component, pooled over seeds; NaN for a component
    landed in once; a resample without any finite square is NaN."""
    rng = np.random.default_rng(6)
    coords = rng.normal(size=(9, 3)) * [1, 2, 3]
    landed = np.array([0, 0, 0, 0, 1, 1, 1, 2, 0])
    squares = cal.squared_spread(coords, landed)
    assert np.isnan(squares[7]) and np.isfinite(np.delete(squares, 7)).all()
    for k in (0, 1):
        mine = landed == k
        assert squares[mine].mean() == pytest.approx(coords[mine].var(0, ddof=1).sum(), rel=1e-12)
    pooled = np.concatenate([np.full(5, coords[landed == 0].var(0, ddof=1).sum()),
                             np.full(3, coords[landed == 1].var(0, ddof=1).sum())]).mean()
    assert cal.spread_ratio(squares, 2.0, np.arange(9)) == pytest.approx(pooled / 2, rel=1e-12)
    assert cal.spread_ratio(squares, 2.0, np.array([[0, 1], [7, 7]]))[0] == pytest.approx(squares[:2].mean() / 2)
    assert np.isnan(cal.spread_ratio(squares, 2.0, np.array([[0, 1], [7, 7]]))[1])


def test_landing_and_tv_against_bincount():
    landed, target = np.array([0, 2, 2, 3, 2]), np.array([0.5, 0.2, 0.2, 0.1])
    freq = np.bincount(landed, minlength=4) / 5
    assert cal.landing_frequencies(landed, 4, np.arange(5)).tolist() == freq.tolist()
    assert cal.total_variation(landed, target, np.arange(5)) == pytest.approx(0.5 * np.abs(freq - target).sum())
    assert cal.total_variation(landed, target, np.array([[0, 0], [1, 2]])).tolist() == pytest.approx([0.5, 0.8])


def test_wasserstein_of_a_stack_matches_scipy():
    rng = np.random.default_rng(0)
    reference, samples = rng.gamma(2.0, size=100), rng.normal(2, 1, size=(3, 17))
    expected = [wasserstein_distance(s, reference) for s in samples]
    assert cal.wasserstein(reference)(samples) == pytest.approx(expected, abs=1e-12)


def noised_posterior_score(bed, z, abar, prompt):
    """∇log p_t(z | y) of the exact posterior noised to ᾱ: components N(√ᾱ m_k, ᾱΣ + (1 − ᾱ)I), autograd."""
    z = z.clone().requires_grad_(True)
    d = (z[:, None] - abar ** 0.5 * bed.means) @ bed.basis
    log_p = bed.posterior_log_weights(prompt) - 0.5 * (d ** 2 / (abar * bed.variance + 1 - abar)).sum(-1)
    torch.logsumexp(log_p, 1).sum().backward()
    return z.grad


@pytest.mark.parametrize("prompt, w", [("", 0.0), ("plain", 0.0), ("plain", 1.0)])
def test_cfg_field_with_y_is_the_noised_exact_posterior_score(bed, prompt, w):
    """At w = 0 and 1 the guided score plus y's closed-form likelihood term is ∇log p_t(z | y) of the exact
    posterior (under "" and under the prompt), built independently from the bed's dense posterior."""
    field = cal.CFGField(bed, prompt, w)
    g = torch.Generator().manual_seed(0)
    for abar in (0.01, 0.3, 0.9, 0.999):
        z = bed.means[torch.randint(0, 4, (5,), generator=g)] * abar ** 0.5 + (1 - abar) ** 0.5 * torch.randn(
            5, 256, generator=g, dtype=torch.float64)
        ref = noised_posterior_score(bed, z, abar, prompt if w == 1 else "")
        mine = field.score(z @ field.u, abar) @ field.u.T
        assert (mine - ref).abs().max() < 1e-9 * ref.abs().max()


def test_cfg_field_without_y_is_the_priors_cfg_noise_prediction(bed):
    """ε of the field without y against ε_uc + w(ε_c − ε_uc) of the analytic prior itself at integer t."""
    field = cal.CFGField(bed, "plain", 2.5, with_y=False)
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    uc, c = bed.prior.embed(["", "plain"]).double().chunk(2)
    for t in (999, 500, 20):
        abar = float(bed.prior.alphas_cumprod[t])
        e_uc, e_c = bed.prior.eps(z, t, uc.expand(4, -1, -1)), bed.prior.eps(z, t, c.expand(4, -1, -1))
        expected = (e_uc + 2.5 * (e_c - e_uc)).flatten(1)
        mine = field.eps(z.flatten(1) @ field.u, abar) @ field.u.T
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-5)  # the weights are float32


def test_cfg_ode_samples_the_exact_posterior_at_w_0(bed):
    """The ODE from σ = 1e4 at w = 0 with y is an exact posterior sampler: 1000 draws land with TV ≤ 0.06 of the
    exact weights (SE per weight ≤ 0.016: a false failure below 1e-3), their residuals average 0.99 floors like
    exact draws (the measured directions are resolved), and 20 against 40 Heun steps move ≤ 1 % of the landings;
    from the samplers' start σ(ᾱ_999) the rare detail is over-weighted (the start's bias)."""
    field = cal.CFGField(bed, "", 0.0)
    noise = torch.randn(1000, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    landed = lambda z: torch.cdist(z, bed.means).argmin(1)
    z40 = cal.cfg_ode(field, noise, 40)
    k20, k40 = landed(cal.cfg_ode(field, noise, 20)), landed(z40)
    weights = bed.tilted_log_weights("", 0.0).exp()
    assert 0.5 * (torch.bincount(k40, minlength=4) / 1000 - weights).abs().sum() < 0.06
    assert (k20 != k40).float().mean() <= 0.01
    assert 0.96 < bed.residuals(z40.view(-1, *bed.latent_shape)).mean() < 1.02
    late = landed(cal.cfg_ode(field, noise, 40, sigma_max=14.6))
    assert (late == 2).float().mean() > (k40 == 2).float().mean()


def test_build_bed_is_the_documented_construction():
    """build_bed(root) rebuilt from its pieces: y = A(decode μ_0) + σn with n from manual_seed(0); `matrix` is
    A∘decode applied to latents; the detail means are encode(cat) + hidden_details' directions at RMS 0.3 (orthogonal,
    in M's null space) and the last one encode(rocket); s and β are the module's."""
    from treg.config import SAMPLES
    from treg.latent_ops import linear_map
    from treg.priors.analytic import load_image
    hidden_details = cal.hidden_details
    bed = cal.build_bed(ROOT)
    prior, mu = bed.prior, bed.prior.means(8, 8)
    noise = (bed.y - bed.op.A(prior.decode(mu[:1]))) / bed.sigma
    torch.testing.assert_close(noise, torch.randn(bed.y.shape, generator=torch.Generator().manual_seed(0)),
                               rtol=0, atol=1e-3)
    forward = linear_map(prior, bed.op)[0]
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(z.flatten(1) @ bed.matrix, bed.op.A(prior.decode(z)).flatten(1), rtol=0, atol=1e-10)
    images = torch.cat([load_image(SAMPLES / name, 64) for name in ("cat_1.jpg", "rocket.jpg")]).double()
    content = prior.encode(images)
    details = mu[:3].double() - content[:1]
    dots = details.flatten(1) @ details.flatten(1).T / 256
    torch.testing.assert_close(dots, 0.09 * torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)  # RMS 0.3, ⟂
    assert (details.flatten(1) @ bed.matrix).abs().max() < 1e-5  # M cannot see them
    expected, _ = hidden_details(bed.gram, forward, (4, 8, 8), bed.sigma, 3, rms=cal.DETAIL_RMS)
    torch.testing.assert_close(details, expected, rtol=0, atol=1e-6)  # float32 means
    torch.testing.assert_close(mu[3].double(), content[1], rtol=0, atol=1e-6)
    assert (prior.std, prior.beta) == (cal.STD, cal.BETA)


def test_exact_draws_are_the_documented_function_of_the_generator(bed):
    """k ~ w by torch.multinomial, then n ~ N(0, I) float64 from the same generator, z = m_k + Σ_j V_j √var_j n_j
    (written per eigenvector): the draws replay exactly, so seeded benchmark cells are reproducible."""
    log_w = bed.tilted_log_weights("", 0.0)
    z, k = bed.exact_draws(log_w, 6, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    k_ref = torch.multinomial(log_w.exp(), 6, replacement=True, generator=g)
    n = torch.randn(6, 256, generator=g, dtype=torch.float64)
    z_ref = bed.means[k_ref] + torch.einsum("ij,bj,j->bi", bed.basis, n, bed.variance.sqrt())
    assert k.tolist() == k_ref.tolist()
    torch.testing.assert_close(z.flatten(1), z_ref, rtol=0, atol=1e-12)


def test_statistics_rel_l2_landings_cfg_law_support_and_per_seed_data(bed, monkeypatch):
    """On latents m_k + d with known k and d: rel_l2 is ‖d‖/‖m_k‖ per seed, landed_<caption> and tv_cfg are the
    bincount frequencies and ½Σ|freq − law|, a component of weight exactly SUPPORT counts as consistent (≥), tv_cfg
    exists only with a law, and the per-seed data hold target, landings, residuals and rel_l2."""
    k = torch.tensor([0, 0, 1, 3, 3, 2, 0])
    d = 0.05 * torch.randn(7, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = (bed.means[k] + d).view(7, *bed.latent_shape)
    log_w = torch.tensor([0.5, 0.3, 0.2 - cal.SUPPORT, cal.SUPPORT], dtype=torch.float64).log()
    monkeypatch.setattr(cal, "SUPPORT", log_w.exp()[3].item())  # the threshold at that weight, to the last bit
    law = np.array([0.1, 0.2, 0.3, 0.4])
    reference = np.linspace(0.5, 1.5, 11)
    fns, runs = cal.statistics(bed, z, log_w, reference, law=law)
    everyone = np.arange(7)
    rel = (d.norm(dim=1) / bed.means[k].norm(dim=1)).numpy()
    assert fns["rel_l2"](everyone) == pytest.approx(rel.mean(), rel=1e-12)
    assert fns["rel_l2"](everyone[:, None]) == pytest.approx(rel, rel=1e-12)  # one seed per resample
    freq = np.bincount(k.numpy(), minlength=4) / 7
    for j, caption in enumerate(bed.captions):
        assert fns[f"landed_{caption}"](everyone) == pytest.approx(freq[j])
    assert fns["tv_cfg"](everyone) == pytest.approx(0.5 * np.abs(freq - law).sum())
    rows = np.array([[0, 1, 5], [2, 3, 6]])  # a stack of two resamples
    by_row = [0.5 * np.abs(np.bincount(k.numpy()[r], minlength=4) / 3 - law).sum() for r in rows]
    assert fns["tv_cfg"](rows).tolist() == pytest.approx(by_row)
    assert fns["landed_plain"](rows).tolist() == pytest.approx([np.mean(k.numpy()[r] == 2) for r in rows])
    assert fns["consistent"](everyone) == 1  # the two seeds in the SUPPORT-weight component count
    assert "tv_cfg" not in cal.statistics(bed, z, log_w, reference)[0]
    assert set(runs) == {"target", "landed", "residual", "rel_l2"} and runs["landed"] == k.tolist()
    misfit = bed.y.double().flatten() - bed.op.A(bed.prior.decode(z)).flatten(1)
    assert np.allclose(runs["residual"], misfit.norm(dim=1) / (0.01 * 192 ** 0.5), rtol=0, atol=1e-4)
    assert np.allclose(runs["rel_l2"], rel, rtol=0, atol=1e-5)
    assert np.allclose(runs["target"], log_w.exp(), rtol=0, atol=1e-6)


class GaussianField:
    """A one-component field N(μ, s²I) in coordinates rotated by u: ε̂(a) = √(1−ᾱ)(a − √ᾱμ)/(ᾱs² + 1 − ᾱ)."""

    def __init__(self, mu, s, u):
        self.mu, self.s, self.u = mu, s, u

    def eps(self, a, abar):
        return (1 - abar) ** 0.5 * (a - abar ** 0.5 * self.mu) / (abar * self.s ** 2 + 1 - abar)


def test_cfg_ode_is_heuns_method_then_tweedie_on_a_gaussian():
    """On one Gaussian, where dx̄/dσ = σ(x̄ − μ)/(s² + σ²) in DDIM's variables: cfg_ode against Heun's method on the
    geometric σ grid written out in x̄ (to 1e-12), and with many steps against the exact flow
    x̄(σ) − μ ∝ √(s² + σ²) followed by the Tweedie step μ + (x̄ − μ)s²/(s² + σ_min²)."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    mu, s = torch.randn(5, generator=g, dtype=torch.float64), 0.3
    field, noise = GaussianField(mu, s, u), torch.randn(4, 5, generator=g, dtype=torch.float64)
    slope = lambda x, sigma: sigma * (x - mu) / (s ** 2 + sigma ** 2)
    hi, lo = 2.0, 0.2
    for steps in (1, 3):
        sig = [hi * (lo / hi) ** (i / steps) for i in range(steps + 1)]
        x = noise * (1 + hi ** 2) ** 0.5
        for s0, s1 in zip(sig[:-1], sig[1:]):
            guess = x + (s1 - s0) * slope(x, s0)
            x = x + (s1 - s0) * (slope(x, s0) + slope(guess, s1)) / 2
        x = x - lo * slope(x, lo)
        torch.testing.assert_close(cal.cfg_ode(field, noise, steps, hi, lo), x @ u.T, rtol=0, atol=1e-12)
    x_lo = mu + (noise * (1 + hi ** 2) ** 0.5 - mu) * ((s ** 2 + lo ** 2) / (s ** 2 + hi ** 2)) ** 0.5
    exact = mu + (x_lo - mu) * s ** 2 / (s ** 2 + lo ** 2)
    torch.testing.assert_close(cal.cfg_ode(field, noise, 1000, hi, lo), exact @ u.T, rtol=0, atol=1e-6)


def test_spread_edge_cases_are_exact_and_silent():
    """A component landed in exactly twice has its unbiased variance (not NaN); spread_ratio of a stack of
    resamples is per row, and a resample with one finite square is that square; NaN cases raise no warning."""
    import warnings
    coords = np.array([[0.0, 1.0], [2.0, 5.0], [1.0, 1.0], [3.0, 0.0], [4.0, 2.0], [7.0, 7.0]])
    landed = np.array([0, 0, 1, 1, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        squares = cal.squared_spread(coords, landed)
        nan_row = cal.spread_ratio(squares, 2.0, np.array([[5, 5], [0, 5], [0, 1], [2, 4]]))
    assert squares[:2].mean() == pytest.approx(coords[:2].var(0, ddof=1).sum(), rel=1e-12)  # 2 + 8 = 10
    assert squares[2:5].mean() == pytest.approx(coords[2:5].var(0, ddof=1).sum(), rel=1e-12) and np.isnan(squares[5])
    assert np.isnan(nan_row[0])
    assert nan_row[1:].tolist() == pytest.approx([squares[0] / 2, squares[:2].mean() / 2, squares[[2, 4]].mean() / 2])


def test_permutation_pvalues_tie_tolerance_and_seeding():
    """A statistic c(number of variant solutions in the index) makes every flip of k seeds give c(n−k) − c(k): with
    the sign patterns replayed from default_rng(seed), a permuted |difference| within 1e-12·max(|observed|, 1) of
    the observed one (its edge included) counts as a tie, one just beyond does not; the default seed is 0."""
    n, resamples = 6, 300
    swap = np.random.default_rng(0).integers(0, 2, (resamples, n))
    one_flip = np.isin(swap.sum(1), (1, n - 1))  # these rows see c(n−1) − c(1) up to sign
    assert 0 < one_flip.sum() < resamples

    def expected(observed, near, ties):
        return (1 + one_flip.sum() * ties + (swap.sum(1) == n).sum() + (swap.sum(1) == 0).sum()) / (1 + resamples)

    cases = [(1.0, 1.0 - 1e-12, True),            # on the edge of the tolerance: a tie
             (1.0, 1.0 - 1.5e-12, False),          # beyond an absolute 1e-12
             (1000.0, 1000.0 - 1e-10, True)]       # within 1e-12·|observed|
    for observed, near, ties in cases:
        table = np.zeros(n + 1)
        table[n], table[n - 1] = observed, near
        stat = lambda i, t=table: t[(i >= n).sum(-1)]
        pooled = {name: stat for name in cal.TESTED}
        got = cal.permutation_pvalues(pooled, n, resamples=resamples)["residual"]
        assert got == pytest.approx(expected(observed, near, ties), abs=1e-15), (observed, near)
    values = np.random.default_rng(8).normal(size=2 * n)
    pooled = {name: (lambda i: values[i].mean(-1)) for name in cal.TESTED}
    assert cal.permutation_pvalues(pooled, n, resamples=50) == cal.permutation_pvalues(pooled, n, seed=0,
                                                                                       resamples=50)


def test_flag_rules_order_and_boundaries():
    """flagged sorts by p-value (not by name); an interval touching 0 from below or straddling it is no flag; the
    paired differences' default seed is 0."""
    assert list(cal.flagged({"a_large": 0.001, "b_small": 0.0001, "c": 0.5})) == ["b_small", "a_large"]
    assert cal.bootstrap_flags({"touch": (0, -1, 0), "inside": (0, -0.5, 0.5), "below": (-1, -2, -1e-9)}) == ["below"]
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=12), rng.normal(size=12)
    correct = {name: (lambda i: a[i].mean(-1)) for name in cal.TESTED}
    wrong = {name: (lambda i: b[i].mean(-1)) for name in cal.TESTED}
    r = np.random.default_rng(0)
    d = [(b[i] - a[i]).mean() for i in (r.integers(0, 12, 12) for _ in range(cal.PAIRED_BOOTSTRAP))]
    tail = 100 * cal.FAMILY_LEVEL / len(cal.TESTED) / 2
    expected = ((b - a).mean(), *np.percentile(d, [tail, 100 - tail]))
    assert cal.paired_differences(correct, wrong, 12)["rel_l2"] == pytest.approx(expected, abs=1e-12)


def test_intervals_share_the_bootstrap_resamples():
    """intervals() against a percentile bootstrap written out with NumPy on default_rng(seed)'s resamples (the
    same for every statistic), at the default seed 0 and at seed 3; interval's own default seed is 0."""
    data = np.random.default_rng(5).gamma(2.0, size=30)
    fns = {"mean": lambda i: data[i].mean(-1), "max": lambda i: data[i].max(-1)}
    for seed in (0, 3):
        rng = np.random.default_rng(seed)
        index = [rng.integers(0, 30, 30) for _ in range(cal.BOOTSTRAP)]
        expected = {"mean": (data.mean(), *np.percentile([data[i].mean() for i in index], [2.5, 97.5])),
                    "max": (data.max(), *np.percentile([data[i].max() for i in index], [2.5, 97.5]))}
        got = cal.intervals(fns, 30, seed) if seed else cal.intervals(fns, 30)
        assert list(got) == ["mean", "max"]
        for name in fns:
            assert got[name] == pytest.approx(expected[name], abs=1e-12)
        if seed == 0:
            assert cal.interval(fns["mean"], 30) == pytest.approx(expected["mean"], abs=1e-12)


def test_false_flag_rate_counts_both_rules_on_replayed_null_cells(bed, monkeypatch):
    """false_flag_rate with both tests stubbed and recorded: per repeat r, their inputs are those of a replay (2n
    exact draws in a row from manual_seed(seed): the permutation test on all 2n at seed r, the paired bootstrap on
    the two halves at seed r; per-seed residuals compared), and each rule's count is the number of repeats the
    (stubbed) rule flagged, at the default seed 0 and at seed 4."""
    log_w = bed.tilted_log_weights("", 0.0)
    reference = np.linspace(0.6, 1.4, 21)
    n, repeats, calls = 3, 3, []
    pattern = {"permutation": [True, False, True], "bootstrap": [True, True, False]}
    per_seed = lambda fns, m: fns["residual"](np.arange(m)[:, None])

    def fake_pvalues(pooled, m, seed):
        calls.append(("perm", per_seed(pooled, 2 * m), m, seed))
        return {"tv": 0.001 if pattern["permutation"][seed] else 0.9}

    def fake_differences(first, second, m, seed):
        calls.append(("boot", np.concatenate([per_seed(first, m), per_seed(second, m)]), m, seed))
        return {"tv": (0.1, 0.05, 0.2) if pattern["bootstrap"][seed] else (0.0, -0.1, 0.1)}

    monkeypatch.setattr(cal, "permutation_pvalues", fake_pvalues)
    monkeypatch.setattr(cal, "paired_differences", fake_differences)
    for seed in (0, 4):
        calls.clear()
        got = cal.false_flag_rate(bed, log_w, reference, n, repeats, seed=seed) if seed else cal.false_flag_rate(
            bed, log_w, reference, n, repeats)
        assert got == {"permutation": (2, repeats), "bootstrap": (2, repeats)}
        g = torch.Generator().manual_seed(seed)
        assert [c[0] for c in calls] == ["perm", "boot"] * repeats
        for r in range(repeats):
            z = bed.exact_draws(log_w, 2 * n, g)[0]
            residuals = bed.residuals(z).numpy()
            for kind, values, m, s in calls[2 * r: 2 * r + 2]:
                assert (m, s) == (n, r), kind
                np.testing.assert_allclose(values, residuals, rtol=0, atol=1e-12)
