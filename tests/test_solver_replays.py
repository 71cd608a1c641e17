"""Every step of DDIM, latent DPS, P2L, RED-diff and TReg's optional branches replayed from the papers' updates,
written out here (not through treg.diffusion or treg.linalg), on the float64 analytic prior at 32 px with ×4 SR
(Aᵀ ≠ A⁺) and a batch of two images with per-image generators; gradients by autograd of the written-out losses,
Adam by torch.optim.Adam on them; adaptive negation against its closed form on features that reach Adam's ε."""
import math

import pytest
import torch
import torch._dynamo  # noqa: F401 (torch.optim's first step imports it, ~10 s: here it happens once, at collection)

from treg.priors.analytic import AnalyticPrior
from treg.images import load_image
from treg.operators import build_operator
from treg.priors.analytic import sd15_alphas_cumprod
from treg.solvers.latent import (WEIGHTINGS, DDIMConfig, DPSConfig, P2LConfig, PSLDConfig, REDDiffConfig, TRegConfig,
                          adaptive_negation, ddim, dps, p2l, psld, reddiff, snr_weight, treg)

NULL_PROMPT = "out of focus, depth of field"
STEPS = 8
SEEDS = (5, 6)


@pytest.fixture(scope="module")
def bed():
    """Float64 analytic prior at 32 px, ×4 SR of two sample images (σ_y = 0.01), prompt and null embeddings
    expanded to the batch."""
    base = AnalyticPrior.from_folder()
    prior = AnalyticPrior(base.captions, means=base.means(4, 4).double(), std=base.std, beta=base.beta)
    op = build_operator("super_resolution", 32, scale=4).double()
    x = torch.cat([load_image(f"samples/{name}", 32) for name in ("cat_1.jpg", "rocket.jpg")]).double()
    y = op.A(x) + 0.01 * torch.randn(op.A(x).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    uc, c = prior.embed([NULL_PROMPT, "a photo of a cat"]).double().chunk(2)
    return prior, op, y, uc.expand(2, -1, -1), c.expand(2, -1, -1)


def generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def start_noise():
    """z_T: each image's first draw from its own generator, (1, 4, 4, 4) each."""
    return torch.cat([torch.randn(1, 4, 4, 4, generator=g) for g in generators()]).double()


def grid(prior, steps, shift=True):
    """(t, ᾱ, ᾱ') per step: t = 1 + (1000/steps)·k descending; the official shift reads ᾱ[t−1], ᾱ[t−1−skip],
    diffusers' convention ᾱ[t], ᾱ[t−skip]; ᾱ[0] past the start."""
    ac, skip = prior.alphas_cumprod.double(), 1000 // steps
    out = []
    for k in reversed(range(steps)):
        t = skip * k + 1
        now, prev = (t - 1, t - 1 - skip) if shift else (t, t - skip)
        out.append((t, ac[now].item(), ac[prev].item() if prev >= 0 else ac[0].item()))
    return out


def cfg_eps(prior, z, t, uc, c, w):
    return prior.eps(z, t, uc) + w * (prior.eps(z, t, c) - prior.eps(z, t, uc))


def clean(z, eps, a):
    return (z - (1 - a) ** 0.5 * eps) / a ** 0.5


def close(got, want, rel):
    """|got − want| ≤ rel·max|want| elementwise (float32 start noise and float32 UNet-side arithmetic in the
    solvers whose state stays float32 set `rel`)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.abs().max().item(), (err, want.abs().max().item())


def residual(op, y, x):
    return (y - op.A(x)).flatten(1).norm(dim=1)


def check_steps(seen, ts, steps):
    """The documented callback keys: i, steps and t at every step, in order."""
    assert [(info["i"], info["steps"], info["t"]) for info in seen] == [(i, steps, t) for i, t in enumerate(ts)]


# --- DDIM and latent DPS --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [True, False])
def test_ddim_replays_cfg_ddim(bed, shift):
    """z' = √ᾱ'·ẑ0 + √(1−ᾱ')·ε̂, ε̂ = ε_uc + w(ε_c − ε_uc), ẑ0 = (z − √(1−ᾱ)ε̂)/√ᾱ; the output is D(ẑ0) of the
    last step; both ᾱ indexings."""
    prior, op, y, uc, c = bed
    w, seen = 3.0, []
    x = ddim(prior, op, y, DDIMConfig(steps=STEPS, cfg_guidance=w, official_shift=shift), c=c[:1], uc=uc[:1],
             generator=generators(), callback=seen.append)
    z = start_noise()
    check_steps(seen, [t for t, _, _ in grid(prior, STEPS, shift)], STEPS)
    for info, (t, a, a_prev) in zip(seen, grid(prior, STEPS, shift), strict=True):
        eps = cfg_eps(prior, z, t, uc, c, w)
        z0 = clean(z, eps, a)
        close(info["z0"], z0, 1e-5)
        z = a_prev ** 0.5 * z0 + (1 - a_prev) ** 0.5 * eps
    close(x, prior.decode(z0), 1e-5)


@pytest.mark.parametrize("shift", [True, False])
def test_dps_replays_the_autograd_step(bed, shift):
    """Latent DPS: z' = √ᾱ'·ẑ0 + √(1−ᾱ')·ε̂ − ζ·∇_z Σ_b ‖y_b − A D(ẑ0(z_b))‖ with the gradient through the CFG ε̂;
    both ᾱ indexings."""
    prior, op, y, uc, c = bed
    w, zeta, seen = 2.0, 0.3, []
    x = dps(prior, op, y, DPSConfig(steps=STEPS, cfg_guidance=w, step_size=zeta, official_shift=shift), c=c[:1],
            uc=uc[:1], generator=generators(), callback=seen.append)
    z = start_noise()
    check_steps(seen, [t for t, _, _ in grid(prior, STEPS, shift)], STEPS)
    for info, (t, a, a_prev) in zip(seen, grid(prior, STEPS, shift), strict=True):
        with torch.enable_grad():
            z_ = z.clone().requires_grad_()
            eps = cfg_eps(prior, z_, t, uc, c, w)
            z0 = clean(z_, eps, a)
            grad, = torch.autograd.grad(residual(op, y, prior.decode(z0)).sum(), z_)
        close(info["z0"], z0.detach(), 1e-5)
        z = a_prev ** 0.5 * z0.detach() + (1 - a_prev) ** 0.5 * eps.detach() - zeta * grad
    close(x, prior.decode(z0.detach()), 1e-5)


def test_psld_replays_the_autograd_step_with_a_dense_pseudo_inverse(bed):
    """PSLD: z' = √ᾱ'·ẑ0 + √(1−ᾱ')·ε̂ − ∇_z Σ_b [ω‖y − A D(ẑ0)‖ + γ‖ẑ0 − E(A⁺y + (I − A⁺A) D(ẑ0))‖], written with
    a dense A⁺ = torch.linalg.pinv(A), the CFG ε̂ and diffusers' ᾱ indexing; ω, γ away from their defaults."""
    prior, op, y, uc, c = bed
    cfg = PSLDConfig(steps=STEPS, cfg_guidance=2.0, official_shift=False, omega=0.7, gamma=0.3)
    seen = []
    x = psld(prior, op, y, cfg, c=c[:1], uc=uc[:1], generator=generators(), callback=seen.append)
    dense = torch.kron(op.matrix.double(), op.matrix.double())
    apply = lambda m, v, n: (m @ v.flatten(2)[..., None]).reshape(*v.shape[:2], n, n)
    A, A_pinv = (lambda v: apply(dense, v, 8)), (lambda v: apply(torch.linalg.pinv(dense), v, 32))
    close(seen[0]["z"], start_noise(), 0)
    check_steps(seen, [t for t, _, _ in grid(prior, STEPS, False)], STEPS)
    for i, (info, (t, a, a_prev)) in enumerate(zip(seen, grid(prior, STEPS, False), strict=True)):
        with torch.enable_grad():
            z_ = info["z"].double().requires_grad_()
            eps = cfg_eps(prior, z_, t, uc, c, cfg.cfg_guidance)
            z0 = clean(z_, eps, a)
            x0 = prior.decode(z0)
            glued = prior.encode(A_pinv(y) + x0 - A_pinv(A(x0)))
            loss = cfg.omega * (y - A(x0)).flatten(1).norm(dim=1) + cfg.gamma * (z0 - glued).flatten(1).norm(dim=1)
            grad, = torch.autograd.grad(loss.sum(), z_)
        eps, z0 = eps.detach(), z0.detach()
        close(info["z0"], z0, 1e-5)
        close(info["eps"], eps, 1e-5)
        if i + 1 < STEPS:
            close(seen[i + 1]["z"], a_prev ** 0.5 * z0 + (1 - a_prev) ** 0.5 * eps - grad, 1e-5)
    close(x, prior.decode(z0), 1e-5)


# --- P2L ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tuning, shift", [("every_step", True), ("first_step", False)])
def test_p2l_replays_adam_on_the_prompt_then_dps(bed, tuning, shift):
    """P2L: per tuned step, `prompt_iters` Adam steps on c for Σ_b ‖y_b − A D(ẑ0(z; c_b))‖² (conditional ε, z
    fixed; one Adam state for the solve; "first_step" tunes at step 0 only), then a DPS step with the CFG ε̂
    between the null text and the tuned prompt, step ζ."""
    prior, op, y, uc, c = bed
    cfg = P2LConfig(steps=STEPS, cfg_guidance=2.5, prompt_lr=0.05, prompt_iters=2, step_size=0.3,
                    prompt_tuning=tuning, official_shift=shift)
    wrong = prior.embed(["a rocket launch"]).double()
    seen = []
    x = p2l(prior, op, y, cfg, c=wrong, uc=uc[:1], generator=generators(), callback=seen.append)
    prompt = wrong.expand(2, -1, -1).clone().requires_grad_()
    opt = torch.optim.Adam([prompt], lr=cfg.prompt_lr)
    close(seen[0]["z"], start_noise(), 0)
    check_steps(seen, [t for t, _, _ in grid(prior, STEPS, shift)], STEPS)
    for i, (info, (t, a, a_prev)) in enumerate(zip(seen, grid(prior, STEPS, shift), strict=True)):
        z = info["z"]  # float32, as the solver's state: Adam's normalised steps amplify float32 vs float64 gaps
        for _ in range(cfg.prompt_iters if tuning == "every_step" or i == 0 else 0):
            with torch.enable_grad():
                loss = residual(op, y, prior.decode(clean(z, prior.eps(z, t, prompt), a))).pow(2).sum()
                opt.zero_grad()
                loss.backward()
            opt.step()
        tuned = prompt.detach()
        close(info["c"], tuned, 1e-6)
        with torch.enable_grad():
            z_ = z.clone().requires_grad_()
            eps = cfg_eps(prior, z_, t, uc, tuned, cfg.cfg_guidance)
            z0 = clean(z_, eps, a)
            grad, = torch.autograd.grad(residual(op, y, prior.decode(z0)).sum(), z_)
        close(info["z0"], z0.detach(), 1e-5)
        want = a_prev ** 0.5 * z0.detach() + (1 - a_prev) ** 0.5 * eps.detach() - cfg.step_size * grad
        if i + 1 < STEPS:
            close(seen[i + 1]["z"], want, 1e-5)
    close(x, prior.decode(z0.detach()), 1e-5)
    moved = (seen[-1]["c"] - seen[0]["c"]).abs().max().item()
    assert (moved > cfg.prompt_lr) == (tuning == "every_step"), moved


# --- RED-diff -------------------------------------------------------------------------------------------------------


# g(s) of RED-diff's `denoise_term_weight` (related-methods.md §1.4), written out
G = {"linear": lambda s: s, "sqrt": math.sqrt, "square": lambda s: s * s, "log": lambda s: math.log(1 + s),
     "trunc_linear": lambda s: s if s < 1 else 1.0, "power2over3": lambda s: math.exp(2 * math.log(s) / 3),
     "const": lambda s: 1.0}


def test_weightings_are_red_diffs_seven():
    """snr_weight(ᾱ, g) = g(√(1−ᾱ)/√ᾱ) at levels on both sides of s = 1 (trunc_linear's knee) and at s = 1."""
    assert set(WEIGHTINGS) == set(G)
    for a in (0.01, 0.3, 0.5, 0.9, 0.999):
        s = math.sqrt((1 - a) / a)
        for name, g in G.items():
            assert snr_weight(a, name) == pytest.approx(g(s), rel=1e-12), (name, a)


@pytest.mark.parametrize("weighting", sorted(G))
def test_reddiff_replays_adam_on_the_written_out_loss(bed, weighting):
    """RED-diff: from z = E(A⁺y), per timestep t (SD's grid, unshifted ᾱ_t) one Adam(lr, betas 0.9, 0.99) step on
    Σ_b [½‖y_b − A D(z_b)‖² + λ·g(s_t)·⟨sg(ε̂(z_t) − ε), z_b⟩], z_t = √ᾱ z + √(1−ᾱ) ε with ε each image's next draw;
    ε̂ the CFG prediction. 4 steps put s on both sides of 1. The output is D(z) after the last step."""
    prior, op, y, uc, c = bed
    cfg = REDDiffConfig(steps=4, cfg_guidance=2.0, lam=0.5, lr=0.05, weighting=weighting)
    seen = []
    x = reddiff(prior, op, y, cfg, c=c[:1], uc=uc[:1], generator=generators(), callback=seen.append)
    z = prior.encode(op.pinv(y)).clone().requires_grad_()
    opt = torch.optim.Adam([z], lr=cfg.lr, betas=(0.9, 0.99))
    gens = generators()
    ts = [1000 // 4 * k + 1 for k in reversed(range(4))]
    levels = [math.sqrt((1 - prior.alphas_cumprod[t].item()) / prior.alphas_cumprod[t].item()) for t in ts]
    assert min(levels) < 1 < max(levels)
    check_steps(seen, ts, 4)
    for info, t, s in zip(seen, ts, levels, strict=True):
        a = prior.alphas_cumprod[t].item()
        noise = torch.cat([torch.randn(1, 4, 4, 4, generator=g) for g in gens]).double()
        z_t = a ** 0.5 * z.detach() + (1 - a) ** 0.5 * noise
        eps = cfg_eps(prior, z_t, t, uc, c, cfg.cfg_guidance)
        with torch.enable_grad():
            fit = 0.5 * (y - op.A(prior.decode(z))).pow(2).sum()
            loss = fit + cfg.lam * G[weighting](s) * ((eps - noise) * z).sum()
            opt.zero_grad()
            loss.backward()
        opt.step()
        close(info["z0"], z.detach(), 1e-10)
    close(x, prior.decode(z.detach()), 1e-10)


def test_reddiff_sweeps_the_priors_own_training_grid(bed):
    """The timesteps follow the prior's number of training steps: with a 500-step ᾱ the grid is 1 + 125·k."""
    prior, op, y, uc, c = bed
    short = AnalyticPrior(prior.captions, means=prior.means(4, 4), std=prior.std, beta=prior.beta)
    short.alphas_cumprod = sd15_alphas_cumprod(500)
    seen = []
    reddiff(short, op, y, REDDiffConfig(steps=4), c=c[:1], uc=uc[:1], generator=generators(), callback=seen.append)
    check_steps(seen, [376, 251, 126, 1], 4)


# --- adaptive negation ----------------------------------------------------------------------------------------------


class Features:
    """A stand-in image encoder with given features, so the closed form can be checked where |∂loss| ~ Adam's ε."""

    def __init__(self, f):
        self.f = f

    def image_features(self, x):
        return self.f


def test_adaptive_negation_closed_form_down_to_adams_eps():
    """Adam on the linear loss Σ_b mean_k⟨f̂_b, uc_bk⟩ has the constant gradient g = f̂_b/L per token, so each of
    `iters` steps moves uc by lr·g/(|g| + ε), ε = 1e-8: −lr·sign(g) where |g| ≫ ε, a fraction of it where |g| ~ ε,
    which pins the loss's scale (unit f̂, per-token mean, per-image sum) as well as its sign."""
    length, dim = 5, 6
    f = torch.tensor([[3.0, -4.0, 1e-7, -2e-7, 5e-8, 0.0],
                      [0.0, 1e-7, 2.0, -1e-8, 0.0, -6e-8]], dtype=torch.float64)
    uc = torch.randn(2, length, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lr, iters = 1e-3, 7
    out = adaptive_negation(Features(f), None, uc, lr, iters)
    g = (f / f.norm(dim=-1, keepdim=True) / length)[:, None, :]
    close(out, uc - iters * lr * g / (g.abs() + 1e-8), 1e-9)
    fraction = ((uc - out) / (iters * lr)).abs()
    assert fraction.max() > 0.999 and ((fraction > 0.05) & (fraction < 0.95)).any()  # both regimes are exercised
    assert not out.requires_grad and uc.grad is None


# --- TReg's optional branches ---------------------------------------------------------------------------------------


def dense_prox(op, x0, y, lamb):
    """argmin ‖A x − y‖² + λ‖x − x0‖² by a dense solve of (AᵀA + λI) x = Aᵀy + λ x0, per channel (A = M ⊗ M)."""
    m = op.matrix.double()
    a = torch.kron(m, m)
    n = x0.shape[-1]
    rhs = (a.T @ y.flatten(2)[..., None]).squeeze(-1) + lamb * x0.flatten(2)
    return torch.linalg.solve(a.T @ a + lamb * torch.eye(n * n, dtype=a.dtype), rhs[..., None]).reshape(x0.shape)


def test_treg_replays_negation_dps_and_an_exact_prox(bed):
    """TReg with adaptive negation, the DPS branch with a fixed step, diffusers' ᾱ indexing, data consistency every
    2nd step while i < 6 of 10, and CG run to convergence (tol 0): x0ʸ is the dense prox of D(ẑ0) with λ; the null
    text moves by −iters·lr·sign(f̂(x0ʸ)) at each data-consistency step and the later steps read the moved one."""
    prior, op, y, uc, c = bed
    cfg = TRegConfig(steps=10, cfg_guidance=3.0, official_shift=False, dc_every=2, dc_until=0.6, cg_iters=60,
                     cg_lamb=3e-3, cg_tol=0.0, use_AN=True, null_lr=0.05, null_iters=3, use_DPS=True, dps_lamb=0.2)
    seen = []
    x = treg(prior, op, y, cfg, c=c[:1], uc=uc[:1], generator=generators(), callback=seen.append)
    dc_steps = [0, 2, 4]  # i % 2 == 0 and i < round(0.6·10): step 6 is the first past the end
    assert [i for i, info in enumerate(seen) if "x0y" in info] == dc_steps
    close(seen[0]["z"], start_noise(), 0)
    null = uc.clone()
    check_steps(seen, [t for t, _, _ in grid(prior, 10, shift=False)], 10)
    for i, (info, (t, a, a_prev)) in enumerate(zip(seen, grid(prior, 10, shift=False), strict=True)):
        z = info["z"].double()
        if i in dc_steps:
            eps = cfg_eps(prior, z, t, null, c, cfg.cfg_guidance)
            z0 = clean(z, eps, a)
            # (step 0's ẑ0 is float32, from the float32 z_T, and so is CG's first product)
            rel = 1e-10 if info["z0"].dtype == torch.float64 else 1e-5
            close(info["x0y"], dense_prox(op, prior.decode(info["z0"].double()), y, cfg.cg_lamb), rel)
            f = prior.image_features(info["x0y"])
            g = (f / f.norm(dim=-1, keepdim=True))[:, None, :] / null.shape[1]
            null = null - cfg.null_iters * cfg.null_lr * g / (g.abs() + 1e-8)
            blend = a_prev * prior.encode(info["x0y"]) + (1 - a_prev) * z0
            want = a_prev ** 0.5 * blend + (1 - a_prev) * eps + (a_prev * (1 - a_prev)) ** 0.5 * info["noise"]
        else:
            with torch.enable_grad():
                z_ = z.clone().requires_grad_()
                eps = prior.eps(z_, t, null)
                z0 = clean(z_, eps, a)
                grad, = torch.autograd.grad(residual(op, y, prior.decode(z0)).sum(), z_)
            eps, z0 = eps.detach(), z0.detach()
            want = a_prev ** 0.5 * z0 + (1 - a_prev) ** 0.5 * eps - cfg.dps_lamb * grad
        rel = 1e-9 if i else 1e-5  # the float32 z_T makes step 0 float32 (x0ʸ and y make the rest float64)
        close(info["z0"], z0, rel)
        close(info["eps"], eps, rel)
        if i + 1 < len(seen):
            close(seen[i + 1]["z"], want, rel)
    close(x, prior.decode(z0), 1e-9)


def test_treg_calibration_options_replay_a_noise_level_prox_and_stochastic_ddim(bed):
    """cg_lamb_noise = k: the prox weight of each data-consistency step is k·σ_y²·ᾱ_t/(1−ᾱ_t) (dense prox, CG to
    convergence); eta: every other step is DDIM with σ_t = η√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}) (Song et al.
    2021, eq. 16), z' = √ᾱ'·ẑ0 + √(1−ᾱ'−σ_t²)·ε̂ + σ_t·n with the n the callback reports."""
    prior, op, y, uc, c = bed
    k, sigma_y, eta = 2.0, 0.5, 0.8  # λ from 1e-2 (t = 901) to 500: well conditioned in float32 at step 0
    cfg = TRegConfig(steps=10, cfg_guidance=2.0, official_shift=False, dc_every=3, dc_until=1.0, cg_iters=80,
                     cg_tol=0.0, cg_lamb_noise=k, sigma_y=sigma_y, eta=eta)
    seen = []
    x = treg(prior, op, y, cfg, c=c[:1], uc=uc[:1], generator=generators(), callback=seen.append)
    assert [i for i, info in enumerate(seen) if "x0y" in info] == [0, 3, 6, 9]  # dc_until 1: to the last step
    for i, (info, (t, a, a_prev)) in enumerate(zip(seen, grid(prior, 10, shift=False), strict=True)):
        z = info["z"].double()
        eps = cfg_eps(prior, z, t, uc, c, cfg.cfg_guidance)
        z0 = clean(z, eps, a)
        rel = 1e-9 if i else 1e-5
        if i % 3 == 0:
            lamb = k * sigma_y ** 2 * a / (1 - a)
            close(info["x0y"], dense_prox(op, prior.decode(info["z0"].double()), y, lamb), 1e-9 if i else 1e-5)
            blend = a_prev * prior.encode(info["x0y"]) + (1 - a_prev) * z0
            want = a_prev ** 0.5 * blend + (1 - a_prev) * eps + (a_prev * (1 - a_prev)) ** 0.5 * info["noise"]
        else:
            s = eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
            assert s > 0.01 and info["noise"].std() > 0.5
            want = a_prev ** 0.5 * z0 + (1 - a_prev - s ** 2) ** 0.5 * eps + s * info["noise"]
        close(info["z0"], z0, rel)
        if i + 1 < len(seen):
            close(seen[i + 1]["z"], want, rel)
    close(x, prior.decode(z0), 1e-9)
    with pytest.raises(ValueError, match="cg_lamb_noise needs sigma_y"):
        treg(prior, op, y, TRegConfig(steps=2, cg_lamb_noise=1.0), c=c[:1], uc=uc[:1])


def test_treg_cg_tolerance_and_iterations_reach_the_prox(bed):
    """The prox's stopping rule is the config's: a tolerance above ‖Aᵀy − AᵀA D(ẑ0)‖ (or 0 iterations) returns D(ẑ0)
    itself; the official 5 iterations at tol 1e-4 move it toward y."""
    prior, op, y, uc, c = bed
    runs = {}
    for name, changes in {"tol": dict(cg_tol=1e3), "iters": dict(cg_iters=0), "default": {}}.items():
        seen = []
        treg(prior, op, y, TRegConfig(steps=4, **changes), c=c[:1], uc=uc[:1], generator=generators(),
             callback=seen.append)
        runs[name] = seen[0]
    for name in ("tol", "iters"):
        assert torch.equal(runs[name]["x0y"], prior.decode(runs[name]["z0"])), name
    d = runs["default"]
    assert (residual(op, y, d["x0y"]) < 0.5 * residual(op, y, prior.decode(d["z0"]))).all()
