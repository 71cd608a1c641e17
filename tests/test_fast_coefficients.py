"""CCI's scalar coefficients (treg.solvers.fast.cci_coefficients, cci_table, _noisy_coefficients) against closed
forms and adaptive quadrature, where tests/test_fast.py checks them only through the solves. Written from mutation
testing (tests/mutation/run.sh)."""
import math

import torch
from scipy.integrate import quad
from scipy.special import beta, betainc

from treg.solvers.fast import cci_coefficients, cci_table


def test_phi_is_zero_at_b_zero_and_phi_j2_is_an_incomplete_beta():
    """Φ(0) = ∫₀⁰ φ = 0 for all five; Φ_j2 = ∫₀^b ½wσ(μ^w − 1) db in closed form: with s = σ (e^{−b} = 1 − s²),
    w∫₀^σ s²[(1 − s²)^{w/2−1} − 1/(1 − s²)] ds = ½w·B(3/2, w/2)·I_{σ²}(3/2, w/2) − w(atanh σ − σ), and
    atanh σ = asinh ρ. cci_coefficients asks quad for epsabs 1e-14, epsrel 1e-12; quad's defaults (1.5e-8) are
    off by 1e-11 here (measured: 8e-12 at b = 0.3, 9e-11 at b = 1.6), the requested ones by ≤ 1e-15 relative."""
    for w in (15.0, 6.0, 0.5, 100.0):
        assert cci_coefficients(0.0, w) == {"y": 0.0, "s1": 0.0, "s2": 0.0, "j1": 0.0, "j2": 0.0}
        for b in (1e-4, 0.3, 1.6, 5.0, 6.9):
            sigma, rho = math.sqrt(-math.expm1(-b)), math.sqrt(math.expm1(b))
            closed = 0.5 * w * beta(1.5, w / 2) * betainc(1.5, w / 2, sigma ** 2) - w * (math.asinh(rho) - sigma)
            got = cci_coefficients(b, w)["j2"]
            assert abs(got - closed) <= 2e-14 * max(1.0, abs(closed)), (w, b, got, closed)


def noisy_integrals(r, b, w):
    """π, E, Φ_y, Φ_s, Φ_j of cci_table at one 0 < r < ∞ and b by scipy's adaptive quad (∫π by quad too)."""
    mu = lambda v: math.exp(-v / 2)
    sig = lambda v: math.sqrt(-math.expm1(-v))
    pi = lambda v: r * sig(v) ** 2 / (r * sig(v) ** 2 + 1)
    integral = lambda f, top: quad(lambda u: 2 * u * f(u * u), 0, top ** 0.5, points=[min(top, 1 / r) ** 0.5],
                                   epsabs=1e-13, epsrel=1e-12, limit=400)[0]
    E = lambda v: math.exp(v / 2 - w / 2 * integral(pi, v))
    return {"pi": pi(b), "E": E(b), "y": integral(lambda v: -0.5 * w * mu(v) * pi(v) * E(v), b),
            "s": integral(lambda v: 0.5 * E(v) * (1 / sig(v) - w * sig(v) * pi(v)), b),
            "j": integral(lambda v: 0.5 * w * mu(v) * sig(v) * E(v), b)}


def test_table_columns_at_r_zero_and_infinity_are_the_closed_forms_and_keep_r_shape():
    """r = 0 (unmeasured): π = 0, E = e^{b/2} = 1/μ, Φ_y = 0, Φ_s = ∫½e^{b/2}/σ = ρ, Φ_j = ∫½wσ = w(asinh ρ − σ);
    r = ∞ (noiseless): π = 1, E = e^{b/2 − wb/2} = μ^{w−1}, Φ_y = μ^w − 1, Φ_s = ρμ^w, Φ_j = ½w·B(3/2, w/2)·I_{σ²}(3/2,
    w/2) (the two Φ_j of the official split summed); a finite r, adaptive quadrature. Each entry of an r shaped
    (2, 1, 3) that mixes the three gets its own column, in r's shape, at every level (b = 0 last: all Φ = 0)."""
    w = 15.0
    levels = [1.63, 0.2, 0.0]
    r = torch.tensor([[[math.inf, 0.0, 30.0]], [[30.0, math.inf, 0.0]]], dtype=torch.float64)
    table = cci_table(levels, w, r)
    for n, b in enumerate(levels):
        mu, sigma, rho = math.exp(-b / 2), math.sqrt(-math.expm1(-b)), math.sqrt(math.expm1(b))
        unmeasured = {"pi": 0.0, "E": 1 / mu, "y": 0.0, "s": rho, "j": w * (math.asinh(rho) - sigma)}
        noiseless = {"pi": 1.0, "E": mu ** (w - 1), "y": mu ** w - 1, "s": rho * mu ** w,
                     "j": 0.5 * w * beta(1.5, w / 2) * betainc(1.5, w / 2, sigma ** 2)}
        noisy = noisy_integrals(30.0, b, w) if b > 0 else {"pi": 0.0, "E": 1.0, "y": 0.0, "s": 0.0, "j": 0.0}
        for key in ("pi", "E", "y", "s", "j"):
            got = table[key][n]
            assert got.shape == r.shape and got.dtype == torch.float64
            for index, value in [((0, 0, 0), noiseless), ((1, 0, 1), noiseless), ((0, 0, 1), unmeasured),
                                 ((1, 0, 2), unmeasured), ((0, 0, 2), noisy), ((1, 0, 0), noisy)]:
                expected = value[key]
                assert abs(got[index].item() - expected) <= 1e-9 * max(1.0, abs(expected)), (key, b, index)


def test_noisy_coefficients_fill_every_r_when_r_spans_several_passes():
    """_noisy_coefficients works through r in passes of ~32 MB of temporaries; with 200 nodes per panel a pass holds
    ~400 values of r, so 1,500 values take four passes and every column must equal the column of its r alone (a blur
    at 512² has 786,432 values of r)."""
    from treg.solvers.fast import _noisy_coefficients
    levels, w = [1.63, 0.7, 0.2], 15.0
    r = torch.logspace(-2, 4, 1500, dtype=torch.float64)
    whole = _noisy_coefficients(levels, w, r, nodes=200)
    for j in (0, 700, 1499):
        torch.testing.assert_close(whole[..., j], _noisy_coefficients(levels, w, r[j:j + 1], nodes=200)[..., 0],
                                   rtol=1e-12, atol=0)
