"""The deepinv side by side (treg/bench/deepinv.py) in the CI venv, which has no deepinv: the one-line refusal, the
bed seen as a pixel prior against the bed itself, the mixture's MMSE denoiser against Tweedie's formula, the
two-sample permutation test against full enumeration, the Bonferroni verdict, the source patcher, the cell → option
mapping and the report writer. The last test needs deepinv (the second venv of docs/benchmarks.md) and is skipped
without it."""
import itertools
import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from treg.bench import beds as cal, deepinv as bench, flags
from treg.bench.calibration import solve_cell, solver_config, solver_of

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bed():
    return cal.build_bed(ROOT)


@pytest.fixture(scope="module")
def view(bed):
    return bench.pixel_view(bed)


def test_without_deepinv_it_exits_with_one_line_and_writes_nothing(tmp_path):
    """`python -m treg bench deepinv --out DIR` where deepinv does not import: exit status 1, one line on stderr
    that says how to install it, no traceback, no file. Where deepinv is installed, its import is blocked."""
    out = tmp_path / "sub" / "deepinv"
    argv = ["bench", "deepinv", "--out", str(out)]
    if find_spec("deepinv") is None:
        command = [sys.executable, "-m", "treg", *argv]
    else:
        command = [sys.executable, "-c", "import runpy, sys; sys.modules['deepinv'] = None; sys.argv = ['treg', "
                   + ", ".join(repr(a) for a in argv) + "]; runpy.run_module('treg', run_name='__main__')"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and done.stdout == ""
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: deepinv does not import")
    assert "pip install deepinv==0.5.0 torchvision" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_pixel_view_is_the_bed_with_an_identity_decoder(bed, view):
    """The view's operator is M = A∘decode with M's SVD, the same y, means and weights; our DDRM and DPS on the view
    are our DDRM and DPS on the bed, sample for sample (decode is linear)."""
    z = torch.randn(3, *bed.latent_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m_z = bed.op.A(bed.prior.decode(z)).double()
    torch.testing.assert_close(view.op.A(z), m_z, rtol=1e-6, atol=1e-6)
    d = view.op.svd(None)
    torch.testing.assert_close(d.U(d.Vt(z) * d.singulars), m_z, rtol=1e-6, atol=1e-6)  # U S Vᵀ z = M z
    torch.testing.assert_close(view.prior.decode(z), z, rtol=0, atol=0)
    assert torch.equal(view.y, bed.y) and view.sigma == bed.sigma
    torch.testing.assert_close(view.prior.means(8, 8).double().flatten(1), bed.prior.means(8, 8).double().flatten(1))
    for name in ("ddrm", "dps"):
        cfg = solver_config(name, None, 0.0)
        on_bed, _, _ = solve_cell(bed, solver_of(name), cfg, "", [0, 1, 2])
        on_view, _, _ = solve_cell(view, solver_of(name), cfg, "", [0, 1, 2])
        torch.testing.assert_close(on_view, on_bed, rtol=1e-5, atol=1e-5, msg=name)


def test_mixture_denoiser_is_tweedies_posterior_mean(view):
    """MixtureDenoiser(u, σ/2) = (E[z0 | z] + 1)/2 with u = (z + 1)/2, against Tweedie's E[z0 | z] = z + σ²∇log p_σ(z)
    with p_σ = Σ_k π_k N(μ_k, (s² + σ²)I) differentiated by autograd; σ a scalar or one per image; float32 in, out."""
    prior = view.prior
    mu = prior.means(8, 8).double().flatten(1)
    log_pi = prior.log_weights(prior.embed([""]))[0].double()
    denoiser = bench.MixtureDenoiser(prior)
    g = torch.Generator().manual_seed(0)
    for sigma in (torch.tensor(0.05, dtype=torch.float64), torch.tensor([0.02, 0.3, 1.0, 4.0], dtype=torch.float64)):
        k = torch.tensor([0, 1, 2, 3])
        z = (mu[k] + sigma.reshape(-1, 1) * torch.randn(4, mu.shape[1], generator=g, dtype=torch.float64))
        z.requires_grad_()
        var = prior.std ** 2 + sigma.reshape(-1, 1, 1) ** 2
        log_p = torch.logsumexp(log_pi - ((z[:, None] - mu[None]) ** 2).sum(-1) / (2 * var[..., 0])
                                - mu.shape[1] / 2 * torch.log(var[..., 0]), dim=1)
        score, = torch.autograd.grad(log_p.sum(), z)
        tweedie = (z + sigma.reshape(-1, 1) ** 2 * score).detach()
        u = ((z.detach() + 1) / 2).view(4, *view.latent_shape)
        torch.testing.assert_close(2 * denoiser(u, sigma / 2).flatten(1) - 1, tweedie, rtol=1e-9, atol=1e-9)
        out32 = denoiser(u.float(), (sigma / 2).float())
        assert out32.dtype == torch.float32
        torch.testing.assert_close(2 * out32.double().flatten(1) - 1, tweedie, rtol=1e-4, atol=1e-4)


def test_two_sample_pvalues_against_full_enumeration(bed):
    """4 + 4 solutions: the Monte Carlo p-value of every statistic against the exact permutation p-value, the share
    of all C(8, 4) = 70 splits whose |difference| is at least the observed (ties counted), each statistic computed
    on the pooled cell as documented; a cell against a copy of itself has p = 1 for every statistic."""
    ex_log_w = bed.tilted_log_weights("", 0.0)
    reference = bed.residuals(bed.exact_draws(ex_log_w, 500, torch.Generator().manual_seed(1))[0]).numpy()
    z_a, k_a = bed.exact_draws(ex_log_w, 4, torch.Generator().manual_seed(3))
    z_b, k_b = bed.exact_draws(ex_log_w, 4, torch.Generator().manual_seed(4))
    z_b = (bed.means[k_b] + 1.5 * (z_b.flatten(1) - bed.means[k_b])).view_as(z_b)  # over-dispersed
    resamples = 20000
    got = bench.two_sample_pvalues(bed, z_a, z_b, ex_log_w, reference, resamples, seed=0)
    fns, _ = cal.statistics(bed, torch.cat([z_a, z_b]), ex_log_w, reference)
    splits = [list(a) for a in itertools.combinations(range(8), 4)]
    assert splits[0] == [0, 1, 2, 3]  # the observed labelling
    for name in cal.TESTED:
        diffs = np.array([fns[name](np.array(a)) - fns[name](np.array([i for i in range(8) if i not in a]))
                          for a in splits])
        exact = np.mean(np.abs(diffs) >= np.abs(diffs[0]) - 1e-12)
        assert abs(got[name] - exact) < 0.015, (name, got[name], exact)
        assert round(got[name] * (1 + resamples)) == pytest.approx(got[name] * (1 + resamples), abs=1e-6)
    assert min(got.values()) < 0.5 and set(got) == set(cal.TESTED)  # not all trivially 1
    same = bench.two_sample_pvalues(bed, z_a, z_a.clone(), ex_log_w, reference, 200, seed=0)
    assert same == {name: 1.0 for name in cal.TESTED}


def test_agreement_is_bonferroni_over_the_seven_statistics():
    """A pair agrees unless some p ≤ 0.05/7 = 0.00714...; the flagged statistics come smallest p first."""
    p = dict.fromkeys(cal.TESTED, 0.5)
    assert bench.agreement(p) == (True, {})
    assert bench.agreement(p | {"tv": 0.0072}) == (True, {})
    agrees, flags_ = bench.agreement(p | {"tv": 0.0071, "rel_l2": 0.0005})
    assert not agrees and list(flags_.items()) == [("rel_l2", 0.0005), ("tv", 0.0071)]


class Patchable:
    def method(self, x):
        y = x + 1
        return y * 2


def test_patched_replaces_each_line_once_and_refuses_a_moved_source():
    patched = bench.patched(Patchable, "method", [("y = x + 1", "y = x + 10")])
    assert patched().method(1) == 22 and Patchable().method(1) == 4 and issubclass(patched, Patchable)
    with pytest.raises(RuntimeError, match="expected 'y = x \\+ 2' once .* found 0"):
        bench.patched(Patchable, "method", [("y = x + 2", "y = x")])
    with pytest.raises(RuntimeError, match="found 2"):
        bench.patched(Patchable, "method", [("x", "x")])


class Recorder:
    """Stands in for bench.Deepinv: records which sampler each cell calls and with what."""

    def ddrm(self, n, cfg, sqrt2=True):
        return ("ddrm", sqrt2)

    def diffpir(self, n, cfg, lam, clamp=True, estimate=False):
        return ("diffpir", lam, clamp, estimate)

    def dps(self, n, steps, weight, solver="ddpm", seed=0, profile=None):
        return ("dps", steps, weight, solver, seed, profile)


def test_each_deepinv_cell_calls_deepinv_with_its_documented_change():
    """Each cell's label → the call solve() makes, against a table written out by hand from the cells' texts."""
    matched = {"ddpm": {"matched_weight": 39.8, "levels": [0.5, 0.1], "zeta": [0.05, 0.01]},
               "ddim": {"matched_weight": 78.1, "levels": [0.5, 0.1], "zeta": [0.02, 0.04]}}
    step = solver_config("dps", None, 0.0).step_size
    ours = [step / 0.02, step / 0.04]
    expected = {
        ("ddrm", "deepinv"): (("ddrm", True), 21),
        ("ddrm", "deepinv without /√2"): (("ddrm", False), 21),
        ("diffpir", "deepinv"): (("diffpir", 7.0, True, False), 100),
        ("diffpir", "deepinv λ 3.5"): (("diffpir", 3.5, True, False), 100),
        ("diffpir", "deepinv λ 3.5, no clamp"): (("diffpir", 3.5, False, False), 100),
        ("diffpir", "deepinv λ 3.5, no clamp, estimate"): (("diffpir", 3.5, False, True), 100),
        ("dps", "deepinv"): (("dps", 200, 1.0, "ddpm", 5, None), 199),
        ("dps", "deepinv matched weight"): (("dps", 200, 39.8, "ddpm", 5, None), 199),
        ("dps", "deepinv matched weight, DDIM"): (("dps", 200, 78.1, "ddim", 5, None), 199),
        ("dps", "deepinv DDIM, our step"): (("dps", 200, 1.0, "ddim", 5, ([0.5, 0.1], ours, (-1.0, 1.0))), 199),
        ("dps", "deepinv DDIM, our step, no clip"): (("dps", 200, 1.0, "ddim", 5, ([0.5, 0.1], ours, None)), 199),
    }
    cells = [(s, label) for s, label, impl, _ in bench.cells(flags.DEEPINV_SAMPLERS) if impl == "deepinv"]
    assert cells == list(expected)
    for (sampler, label), want in expected.items():
        assert bench.solve(Recorder(), None, sampler, label, 3, [5, 6, 7], matched) == want, label


def test_report_writer_prints_each_verdict_and_the_dps_steps():
    args = flags.deepinv(["--seeds", "4", "--samplers", "ddrm,dps", "--out", "x"])
    stats = dict.fromkeys(["tv", "spread_measured", "spread_null", "residual", "residual_w1", "rel_l2"],
                          (0.5, 0.25, 0.75))
    rows = [{"nfe": 0, "stats": stats}, {"sampler": "ddrm", "cell": "ours", "nfe": 20, "stats": stats, "what": "w"},
            {"sampler": "ddrm", "cell": "deepinv", "nfe": 21, "stats": stats, "what": "as shipped"}]
    disagree = dict.fromkeys(cal.TESTED, 0.5) | {"tv": 0.006, "rel_l2": 0.0005}
    pairs = [{"sampler": "ddrm", "b": "deepinv", "pvalues": disagree, "agrees": False,
              "flagged_by": bench.agreement(disagree)[1]},
             {"sampler": "dps", "b": "deepinv", "pvalues": dict.fromkeys(cal.TESTED, 0.25), "agrees": True,
              "flagged_by": {}}]
    steps = {"ddpm": {"steps": 200, "zeta": [0.5, 0.25, 0.25], "cosine": [1.0, 0.999998, 1.0], "sum": 1.0,
                      "ours_sum": 200.0, "ratio": 200.0, "matched_weight": 200.0}}
    host = {"platform": "P", "processor": "Q", "cpus": 2, "python": "3", "torch": "T", "deepinv": "0.5.0"}
    text = bench.markdown({"rows": rows, "pairs": pairs, "dps_steps": steps}, args, 90.0, host).splitlines()
    assert text[2] == ("`python -m treg bench deepinv --seeds 4 --samplers ddrm,dps --out x`: 4 seeds per cell, "
                       "1.5 min on 1 CPU thread(s); P (Q, 2 CPUs), Python 3, torch T, deepinv 0.5.0.")
    assert ("| deepinv | 21 | 0.50 [0.25, 0.75] | 0.50 [0.25, 0.75] | 0.50 [0.25, 0.75] | 0.50 [0.25, 0.75] | "
            "0.50 [0.25, 0.75] | 0.500 [0.250, 0.750] | as shipped |") in text
    assert "| ddrm | deepinv | 0.0060 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.0005 | 0.5000 | no: rel_l2, tv |" in text
    assert "| dps | deepinv | " + "0.2500 | " * 7 + "yes |" in text
    assert any("a pair agrees when no p ≤ 0.05/7 = 0.0071 (Bonferroni)" in line for line in text)
    assert ("| ddpm | 3 | 0.999998–1.000000 | 1.000 | 200 | 200.0× | 200.00 | 5.00e-01 | 2.50e-01 | 2.50e-01 |"
            in text)
    assert [line[:12] for line in text if line.startswith("- **")] == ["- **ddrm**: ", "- **dps**: `"]


def test_with_deepinv_its_operator_and_a_small_run(tmp_path, bed, view):
    """Needs deepinv: M as deepinv's DecomposablePhysics in [0, 1] units maps u = (z + 1)/2 to y_u = (M z + M1)/2,
    every patch still applies to its installed source, and a 6-seed run writes all 15 cells and 12 pairs."""
    dinv = pytest.importorskip("deepinv")
    dv = bench.Deepinv(dinv, view)
    z = torch.randn(2, *bed.latent_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(dv.physics.A((z + 1) / 2), (view.op.A(z) + dv.offset) / 2, rtol=1e-9, atol=1e-9)
    assert dv.physics.noise_model.sigma == pytest.approx(bed.sigma / 2)
    bench.patched(dinv.sampling.DDRM, "forward", bench.NO_SQRT2)
    bench.patched(dinv.sampling.DiffPIR, "forward", bench.NO_CLAMP + bench.RETURN_ESTIMATE)
    out = tmp_path / "deepinv"
    bench.main(["--seeds", "6", "--permutations", "50", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["rows"]) == 16 and len(report["pairs"]) == 12
    assert all(0 < p <= 1 for pair in report["pairs"] for p in pair["pvalues"].values())
    for solver in ("ddpm", "ddim"):
        step = report["dps_steps"][solver]
        assert min(step["cosine"]) > 0.999 and step["matched_weight"] == pytest.approx(200 / sum(step["zeta"]))
