"""The calibration bed against independent constructions, its statistics on inputs with known answers, the
sensitivity check catching every known-wrong variant (applied by monkeypatching), and the benchmark end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from treg import bench_calibration as bench, calibration as cal
from treg.posterior import exact_posterior, sample
from treg.solvers import SOLVERS, residual_norm

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bed():
    return cal.build_bed(ROOT)


def test_bed_posterior_agrees_with_the_cg_posterior(bed):
    """Dense means, weights and covariance (eigenbasis of MᵀM) against treg.posterior's matrix-free CG version."""
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
    """Eigenbasis draws against treg.posterior.sample (perturbation–optimisation by CG): landing frequencies,
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
    ex = bench.Experiment(bed, list(range(bench.TEST_SEEDS)))
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
    bench.main(["--solvers", "treg,ddim", "--seeds", "4", "--steps", "3,5", "--guidance", "0,2", "--main_steps", "3",
                "--variants", "control", "--sensitivity_steps", "3", "--out", str(out)])
    table = (tmp_path / "cal.md").read_text()
    assert table == capsys.readouterr().out
    assert (tmp_path / "cal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "cal.json").read_text())
    assert [(r["steps"], r["solver"]) for r in report["calibration"]] == [("any", "exact")] + [
        (s, m) for s in (3, 5) for m in ("treg", "ddim")]
    assert [(r["w"], r["solver"]) for r in report["guidance"]] == [
        (w, m) for w in (0, 2) for m in ("exact", "treg", "ddim")]
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
    from treg.bench_calibration import solver_config, solver_of
    for name in ("cci", "pigdm", "ddrm"):
        cfg = solver_config(name, 5, 0.0)
        assert cfg.sigma_y == 0.01 and cfg.steps == 5 and cfg.cfg_guidance == 0.0
        assert solver_of(name) is SOLVERS[name][0]
    assert solver_of("cci-noiseless") is SOLVERS["cci"][0] and solver_config("cci-noiseless", 5, 0.0).sigma_y == 0
    assert solver_config("cci", 5, 0.0, [("cci.k_start", 999), ("treg.steps", 3)]).k_start == 999  # --set
