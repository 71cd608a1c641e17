"""The solvers' update rules, pinned against formulas written out here independently of treg.diffusion: each step
of TReg (data consistency, DPS branch, plain CFG step) and PSLD's gradient, on the analytic prior in float64, and the
measurement noise that solve.py draws. Breaking any coefficient of these updates fails a test here in seconds."""
import json

import pytest
import torch

import solve
from treg.commands import solve as solve_run
from treg.images import load_image
from treg.operators import build_operator, measure
from treg.priors.analytic import AnalyticPrior
from treg.solvers.latent import PSLDConfig, TRegConfig, psld, treg

NULL_PROMPT = "out of focus, depth of field"
STEPS = 20


@pytest.fixture(scope="module")
def bed():
    """Analytic prior with float64 means at 32 px, ×4 SR (Aᵀ ≠ A⁺), a float64 measurement and text embeddings."""
    base = AnalyticPrior.from_folder()
    prior = AnalyticPrior(base.captions, means=base.means(4, 4).double(), std=base.std, beta=base.beta)
    op = build_operator("super_resolution", 32, scale=4).double()
    x = load_image("samples/cat_1.jpg", 32).double()
    y = op.A(x) + 0.01 * torch.randn(op.A(x).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    uc, c = prior.embed([NULL_PROMPT, "a photo of a cat"]).double().chunk(2)
    return prior, op, y, uc, c


def official_alphas(prior, steps):
    """(t, ᾱ, ᾱ') per step of the official TReg loop, written out: t = 1 + (1000/steps)·k descending, and the
    official code's prepended 1.0 makes the update read ᾱ[t−1] and ᾱ[t−1−skip] (ᾱ[0] past the start)."""
    ac, skip = prior.alphas_cumprod.double(), 1000 // steps
    out = []
    for k in reversed(range(steps)):
        t = skip * k + 1
        out.append((t, ac[t - 1].item(), ac[t - 1 - skip].item() if t - 1 - skip >= 0 else ac[0].item()))
    return out


def record_steps(solver, bed, cfg):
    prior, op, y, uc, c = bed
    infos = []
    solver(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(7), callback=infos.append)
    return infos


def cfg_eps(prior, z, t, uc, c, w):
    return prior.eps(z, t, uc) + w * (prior.eps(z, t, c) - prior.eps(z, t, uc))


def test_every_treg_step_matches_the_written_out_update(bed):
    """z' = √ᾱ'·(ᾱ'·E(x0ʸ) + (1−ᾱ')·ẑ0) + (1−ᾱ')·ε̂ + √(ᾱ'(1−ᾱ'))·n on data-consistency steps, and
    z' = √ᾱ'·ẑ0 + √(1−ᾱ')·ε̂ with ε̂ = ε_uc + w(ε_c − ε_uc) on the others."""
    prior, op, y, uc, c = bed
    w = 5.0
    infos = record_steps(treg, bed, TRegConfig(steps=STEPS, cfg_guidance=w))
    alphas = official_alphas(prior, STEPS)
    dc_steps = [i for i in range(STEPS) if i % 3 == 0 and i < round(0.85 * STEPS)]
    assert [i for i, info in enumerate(infos) if "x0y" in info] == dc_steps
    for i, (t, a, a_prev) in enumerate(alphas[:-1]):
        info, z = infos[i], infos[i]["z"]
        assert info["t"] == t and z.dtype == torch.float64 or i == 0
        eps = cfg_eps(prior, z, t, uc, c, w)
        z0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
        if i in dc_steps:
            blend = a_prev * prior.encode(info["x0y"]) + (1 - a_prev) * z0
            want = a_prev ** 0.5 * blend + (1 - a_prev) * eps + (a_prev * (1 - a_prev)) ** 0.5 * info["noise"]
        else:
            want = a_prev ** 0.5 * z0 + (1 - a_prev) ** 0.5 * eps
        got = infos[i + 1]["z"]
        # z_T is float32 noise, so step 0 runs in float32, where the solver's CFG batch of 2 and the separate
        # calls here may round differently (by ~1e-7 on some CPUs); from step 1 on the state is float64
        tol = 1e-6 if i == 0 else 1e-9
        assert torch.allclose(got, want, rtol=0, atol=tol * want.abs().max()), (i, (got - want).abs().max())


def test_treg_dps_branch_matches_an_autograd_step(bed):
    """With --use_DPS the other steps are z' = √ᾱ'·ẑ0 + √(1−ᾱ')·ε_uc − √ᾱ'·∇_z‖y − A D(ẑ0(z))‖, with ε from the
    null text alone (w = 0), whatever the CFG weight of the data-consistency steps."""
    prior, op, y, uc, c = bed
    infos = record_steps(treg, bed, TRegConfig(steps=STEPS, cfg_guidance=5.0, use_DPS=True))
    alphas = official_alphas(prior, STEPS)
    checked = 0
    for i, (t, a, a_prev) in enumerate(alphas[:-1]):
        if "x0y" in infos[i]:
            continue
        z = infos[i]["z"].detach().clone().requires_grad_()
        with torch.enable_grad():
            z0 = (z - (1 - a) ** 0.5 * prior.eps(z, t, uc)) / a ** 0.5
            loss = (y - op.A(prior.decode(z0))).norm()
            grad, = torch.autograd.grad(loss, z)
        want = a_prev ** 0.5 * z0.detach() + (1 - a_prev) ** 0.5 * prior.eps(z.detach(), t, uc) - a_prev ** 0.5 * grad
        got = infos[i + 1]["z"]
        # z_T is float32 noise, so step 0 runs in float32, where the solver's CFG batch of 2 and the separate
        # calls here may round differently (by ~1e-7 on some CPUs); from step 1 on the state is float64
        tol = 1e-6 if i == 0 else 1e-9
        assert torch.allclose(got, want, rtol=0, atol=tol * want.abs().max()), (i, (got - want).abs().max())
        checked += 1
    assert checked >= 10


def test_psld_step_matches_finite_differences_of_its_loss(bed):
    """PSLD: z' = DDIM(ẑ0, ε̂) − ∇_z[ω‖y − A D(ẑ0)‖ + γ‖ẑ0 − E(A⁺y + (I − A⁺A) D(ẑ0))‖], the gradient taken by
    central differences of the loss written here with a dense A⁺ = torch.linalg.pinv (on ×4 SR, Aᵀ ≠ A⁺)."""
    prior, op, y, uc, c = bed
    n = 32
    dense = torch.kron(op.matrix.double(), op.matrix.double())  # vec(M X Mᵀ) = (M ⊗ M) vec(X), per channel
    dense_pinv = torch.linalg.pinv(dense)
    assert not torch.allclose(dense_pinv, dense.T, atol=1e-3)
    apply = lambda m, v: (m @ v.reshape(*v.shape[:2], -1, 1)).reshape(*v.shape[:2], -1)
    A = lambda x: apply(dense, x).reshape(*x.shape[:2], n // 4, n // 4)
    A_pinv = lambda r: apply(dense_pinv, r).reshape(*r.shape[:2], n, n)
    omega, gamma = 1.0, 0.5
    infos = record_steps(psld, bed, PSLDConfig(steps=STEPS, cfg_guidance=0.0, omega=omega, gamma=gamma))
    alphas = official_alphas(prior, STEPS)
    for i in (2, 9, 15):
        t, a, a_prev = alphas[i]
        z = infos[i]["z"].double()  # PSLD's state is float32 (its noise is); the check runs in float64

        def loss(z_):
            z0 = (z_ - (1 - a) ** 0.5 * prior.eps(z_, t, uc)) / a ** 0.5
            x0 = prior.decode(z0)
            glued = prior.encode(A_pinv(y) + x0 - A_pinv(A(x0)))
            return (omega * (y - A(x0)).norm() + gamma * (z0 - glued).norm()).item()

        h, grad = 1e-5, torch.zeros_like(z)
        for k in range(z.numel()):
            e = torch.zeros(z.numel(), dtype=z.dtype)
            e[k] = h
            e = e.view_as(z)
            grad.view(-1)[k] = (loss(z + e) - loss(z - e)) / (2 * h)
        eps = prior.eps(z, t, uc)
        z0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
        want = a_prev ** 0.5 * z0 + (1 - a_prev) ** 0.5 * eps - grad
        got = infos[i + 1]["z"].double()
        assert torch.allclose(got, want, rtol=0, atol=1e-4 * grad.abs().max()), (i, (got - want).abs().max())


def test_measurement_noise_has_the_configured_std():
    """The measure that solve.py uses draws y − A x with std noise_scale (12,288 values: a 3% band is 4.7 standard
    errors)."""
    assert solve_run.measure is measure
    op = build_operator("super_resolution", 256, scale=4)
    x = load_image("samples/coffee.jpg", 256)
    for sigma in (0.01, 0.05):
        noise = measure(op, x, sigma, [torch.Generator().manual_seed(3)]) - op.A(x)
        assert noise.numel() == 3 * 64 * 64 and abs(noise.std().item() / sigma - 1) < 0.03, noise.std()
        assert abs(noise.mean().item()) < 4 * sigma / noise.numel() ** 0.5


def test_noise_floor_in_run_json_is_sigma_sqrt_m(tmp_path):
    """run.json's noise_floor is σ·√m for the m values of y, and the truth's own residual ‖y − A x‖ is near it."""
    workdir = tmp_path / "out"
    solve.main(["--model", "analytic", "--task_config", "configs/task/super-resolution-x8.yaml", "--image_size", "128",
                "--solver_config", "configs/solver/ddim.yaml", "--steps", "1", "--img_path", "samples/rocket.jpg",
                "--workdir", str(workdir), "--device", "cpu"])
    result = json.loads((workdir / "run.json").read_text())["images"][0]["results"]["ddim"]
    assert result["noise_floor"] == pytest.approx(0.01 * (3 * 16 * 16) ** 0.5, rel=1e-9)
