"""Baseline solvers (latent DPS, PSLD, P2L, latent RED-diff): their maths on the analytic prior (exact ε, float64
where it matters), their shapes and batch independence on the tiny offline SD. Offline, CPU."""
import dataclasses
from pathlib import Path

import pytest
import torch

from treg.priors.analytic import AnalyticPrior
from treg.config import load_solver
from treg.diffusion import guided_eps, randn, tweedie
from treg.images import load_image
from treg.operators import build_operator
from treg.solvers import SOLVERS
from treg.solvers.latent import (DPSConfig, P2LConfig, PSLDConfig, REDDiffConfig, dps, dps_gradient, p2l, psld,
                          reddiff, residual_norm, snr_weight)

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ("dps", "psld", "p2l", "reddiff")
NULL_PROMPT = "out of focus, depth of field"


def measure(op, size, seed=0, sigma=0.01):
    """y = A x + σ n for the cat sample at `size` px."""
    x = load_image(ROOT / "samples/cat_1.jpg", size)
    ax = op.A(x)
    return ax + sigma * torch.randn(ax.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def analytic():
    return AnalyticPrior.from_folder()


def float64_copy(prior, size):
    """The analytic prior at `size` px only, with float64 means: exact ε in double precision."""
    h = size // prior.vae_scale_factor
    return AnalyticPrior(prior.captions, means=prior.means(h, h).double(), std=prior.std, beta=prior.beta)


@pytest.fixture(scope="module")
def analytic_f64(analytic):
    return float64_copy(analytic, 32)


@pytest.fixture(scope="module")
def sr64(analytic):
    """×8 SR at 64 px on the analytic prior, prompt and null prompt as in the README."""
    op = build_operator("super_resolution", 64, scale=8)
    uc, c = analytic.embed([NULL_PROMPT, "a photo of a cat"]).chunk(2)
    return op, measure(op, 64), uc, c


# --- RED-diff -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [996, 601, 201, 21, 1])
def test_red_identity(analytic_f64, t):
    """With the linear weighting, λ·w(t)·(ε̂ − ε) = λ·(z − ẑ0(z_t)): RED-diff's regulariser pulls z toward the
    Tweedie denoiser at noise level t."""
    g = torch.Generator().manual_seed(t)
    z = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(z.shape, generator=g, dtype=torch.float64)
    a = analytic_f64.alphas_cumprod[t].item()
    z_t = a ** 0.5 * z + (1 - a) ** 0.5 * noise
    eps = analytic_f64.eps(z_t, t, analytic_f64.embed(["a photo of a cat"]))
    lam = 0.3
    pull = lam * (z - tweedie(z_t, eps, a))
    assert torch.allclose(lam * snr_weight(a, "linear") * (eps - noise), pull, rtol=1e-9, atol=1e-12)
    # the identity is specific to the linear weighting: the others rescale the pull by g(s)/s
    s = ((1 - a) / a) ** 0.5
    assert torch.allclose(lam * snr_weight(a, "sqrt") * (eps - noise), pull / s ** 0.5, rtol=1e-9, atol=1e-12)
    assert snr_weight(a, "const") == 1.0
    with pytest.raises(ValueError, match="unknown weighting"):
        snr_weight(a, "cubic")


def test_reddiff_step_is_adam_on_the_red_gradient(analytic, sr64):
    """reddiff's first step from E(A⁺y) is Adam's first step, lr·g/(|g| + ε), on g = ∇½‖y − A D(z)‖² + λ(z − ẑ0(z_t)),
    z_t = √ᾱ z + √(1−ᾱ) ε with ε the generator's first draw: summed losses, linear weighting, RED identity. Float64."""
    _, y, uc, c = sr64
    prior = float64_copy(analytic, 64)
    op, y = build_operator("super_resolution", 64, scale=8).double(), y.double()  # a fresh op: .double() is in place
    cfg = REDDiffConfig(steps=2)  # timesteps 501, 1
    seen = []
    reddiff(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(5), callback=seen.append)
    z = prior.encode(op.pinv(y))
    noise = randn(z.shape, torch.Generator().manual_seed(5), "cpu").double()
    t = seen[0]["t"]
    a = prior.alphas_cumprod[t].item()
    z_t = a ** 0.5 * z + (1 - a) ** 0.5 * noise
    with torch.enable_grad():
        z_ = z.clone().requires_grad_()
        data_grad, = torch.autograd.grad(0.5 * (y - op.A(prior.decode(z_))).pow(2).sum(), z_)
    g = data_grad + cfg.lam * (z - tweedie(z_t, prior.eps(z_t, t, c), a))  # cfg_guidance 1: the conditional ε̂
    assert t == 501 and torch.allclose(z - seen[0]["z0"], cfg.lr * g / (g.abs() + 1e-8), rtol=0, atol=1e-12)


# --- DPS and PSLD -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [801, 301, 41])
def test_dps_gradient_matches_finite_differences(analytic_f64, t):
    """∇_z ‖y − A D(ẑ0(z))‖ from dps_gradient (through CFG ε̂ and the decoder) equals central differences, float64."""
    op = build_operator("super_resolution", 32, scale=4).double()
    y = measure(op, 32).double()
    uc, c = analytic_f64.embed([NULL_PROMPT, "a photo of a cat"]).double().chunk(2)
    a = analytic_f64.alphas_cumprod[t - 1].item()
    eps_fn = lambda z_: guided_eps(analytic_f64, z_, t, uc, c, 4.0)
    g = torch.Generator().manual_seed(t)
    z = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    _, z0, grad = dps_gradient(analytic_f64, op, y, z, t, a, eps_fn)
    objective = lambda z_: residual_norm(op, y, analytic_f64.decode(tweedie(z_, eps_fn(z_), a))).sum().item()
    assert torch.allclose(z0, tweedie(z, eps_fn(z), a))
    assert grad.norm() > 0
    h = 1e-5
    for _ in range(3):
        v = torch.randn(z.shape, generator=g, dtype=torch.float64)
        v /= v.norm()
        numeric = (objective(z + h * v) - objective(z - h * v)) / (2 * h)
        assert abs(numeric - (grad * v).sum().item()) <= 1e-6 * grad.norm().item(), (numeric, (grad * v).sum())


def test_psld_without_gluing_is_dps(tiny_prior):
    """PSLD with γ = 0 is latent DPS with step size ω, bit for bit (same seed; ω a power of two, so scaling the
    loss by ω is exact in floating point); γ > 0 changes the result."""
    op = build_operator("super_resolution", 64, scale=8)
    y = measure(op, 64)
    uc, c = tiny_prior.embed([NULL_PROMPT, "a photo of a cat"]).chunk(2)
    run = lambda fn, cfg: fn(tiny_prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(3))
    reference = run(dps, DPSConfig(steps=3, cfg_guidance=4.0, step_size=0.5))
    assert torch.equal(run(psld, PSLDConfig(steps=3, cfg_guidance=4.0, omega=0.5, gamma=0.0)), reference)
    assert not torch.allclose(run(psld, PSLDConfig(steps=3, cfg_guidance=4.0, omega=0.5, gamma=0.5)), reference)


def test_reddiff_returns_the_decode_after_the_last_adam_step(analytic, sr64):
    """The documented choice: the output is D(z) with z after the last update (the official code's is before)."""
    op, y, uc, c = sr64
    seen = []
    x = reddiff(analytic, op, y, REDDiffConfig(steps=4), c=c, uc=uc, generator=torch.Generator().manual_seed(0),
                callback=seen.append)
    assert torch.equal(x, analytic.decode(seen[-1]["z0"])) and not torch.equal(x, analytic.decode(seen[-2]["z0"]))


# --- P2L ----------------------------------------------------------------------------------------------------------


def test_p2l_tunes_the_prompt_toward_the_measurement(analytic, sr64):
    """Started from a wrong prompt, each prompt update lowers the data residual of ẑ0(z_t; c) at its step (strictly
    while the noise is high), and the updates accumulate: at z_T, where ẑ0 is the prompt-weighted prior mean, the
    final prompt fits y better than the prompt after one step, which fits better than the initial one. Float64."""
    prior = float64_copy(analytic, 64)
    op, y = build_operator("super_resolution", 64, scale=8).double(), sr64[1].double()
    uc, wrong = prior.embed([NULL_PROMPT, "a rocket launch"]).double().chunk(2)
    seen = []

    def fit(info, e):
        z, t, a = info["z"], info["t"], prior.alphas_cumprod[info["t"] - 1].item()  # official_shift: ᾱ_{t-1}
        return residual_norm(op, y, prior.decode(tweedie(z, prior.eps(z, t, e), a))).item()

    cfg = P2LConfig(steps=50)
    p2l(prior, op, y, cfg, c=wrong, uc=uc, generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert len(seen) == cfg.steps
    prompts = [wrong] + [info["c"] for info in seen]
    before_after = [(fit(info, old), fit(info, new)) for info, old, new in zip(seen, prompts, prompts[1:])]
    # the prompt matters while the components are not yet told apart: there every update helps; at low noise
    # the mixture responsibilities saturate and an update (Adam's momentum) changes the fit by ~nothing
    high_noise = 3 * cfg.steps // 5
    assert all(after < before for before, after in before_after[:high_noise]), before_after
    assert all(after <= before * (1 + 1e-6) for before, after in before_after), before_after
    at_start = [fit(seen[0], e) for e in (wrong, prompts[1], prompts[-1])]
    assert at_start[2] < at_start[1] < at_start[0], at_start
    assert (prompts[-1] - wrong).abs().max() > 10 * cfg.prompt_lr  # moved by many Adam steps of ≈ lr each


def test_p2l_official_tuning_changes_the_prompt_at_the_first_step_only(analytic, sr64):
    """prompt_tuning "first_step" (the official TReg code's effective behaviour): the prompt after step 0 is the
    per-step variant's first update, and it stays exactly that for the rest of the solve."""
    op, y, uc, _ = sr64
    wrong = analytic.embed(["a rocket launch"])
    runs = {}
    for tuning in ("every_step", "first_step"):
        seen = []
        p2l(analytic, op, y, P2LConfig(steps=6, prompt_tuning=tuning), c=wrong, uc=uc,
            generator=torch.Generator().manual_seed(0), callback=seen.append)
        runs[tuning] = [info["c"] for info in seen]
    first, every = runs["first_step"], runs["every_step"]
    assert torch.equal(first[0], every[0]) and not torch.equal(first[0], wrong)
    assert all(torch.equal(c, first[0]) for c in first[1:])
    assert not torch.equal(every[-1], every[0])  # the default keeps tuning


def test_p2l_official_yaml_is_the_official_settings():
    name, cfg = load_solver(ROOT / "configs/solver/p2l-official.yaml", SOLVERS)
    assert name == "p2l" and cfg == dataclasses.replace(P2LConfig(), prompt_tuning="first_step", cfg_guidance=4.0)


# --- every baseline -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_on_tiny_sd_is_finite_and_batch_independent(name, tiny_prior):
    """3 steps on the tiny SD: a finite (1,3,64,64) image, and image 2 of a batch equals image 2 solved alone."""
    op = build_operator("super_resolution", 64, scale=8)
    y = measure(op, 64)
    y2 = torch.cat([y, y.flip(-1)])
    uc, c = tiny_prior.embed([NULL_PROMPT, "a photo of a cat"]).chunk(2)
    fn, config = SOLVERS[name]
    cfg = dataclasses.replace(config(), steps=3)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    single = fn(tiny_prior, op, y2[1:], cfg, c=c, uc=uc, generator=gens(2))
    both = fn(tiny_prior, op, y2, cfg, c=c, uc=uc, generator=gens(1, 2))
    assert single.shape == (1, 3, 64, 64) and torch.isfinite(both).all()
    assert torch.allclose(both[1:], single, atol=1e-4)


@pytest.fixture(scope="module")
def ddim_residual(analytic, sr64):
    op, y, uc, c = sr64
    name, cfg = load_solver(ROOT / "configs/solver/ddim.yaml", SOLVERS)
    x = SOLVERS[name][0](analytic, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(0))
    return residual_norm(op, y, x).item()


@pytest.mark.parametrize("name", BASELINES)
def test_default_schedule_fits_the_measurement_better_than_ddim(name, analytic, sr64, ddim_residual):
    """Each configs/solver/<name>.yaml, run in full on the analytic prior (×8 SR at 64 px), ends with a data
    residual ‖y − A x̂‖ well below text-only DDIM's (which ignores y)."""
    op, y, uc, c = sr64
    loaded, cfg = load_solver(ROOT / f"configs/solver/{name}.yaml", SOLVERS)
    assert loaded == name and cfg == SOLVERS[name][1]()  # the YAML spells out the dataclass defaults
    steps = []
    x = SOLVERS[name][0](analytic, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(0),
                         callback=lambda info: steps.append(info["i"]))
    assert steps == list(range(cfg.steps))
    assert x.shape == (1, 3, 64, 64) and torch.isfinite(x).all()
    assert residual_norm(op, y, x).item() < 0.5 * ddim_residual
