"""Side by side with deepinv 0.5: its DDRM, DiffPIR and DPS (deepinv.sampling) against our ddrm, diffpir and dps on
the calibration bed, with the same prior, the same operator and the same y. The command line, the cells and the test
are described with `deepinv` in treg/bench/flags.py (`python -m treg bench deepinv --help`); main(argv) is
run(flags.deepinv(argv)). deepinv is imported only by `run` and the functions that take it as `dinv`.

The bed as a pixel prior. deepinv's samplers denoise images, so the bed's prior is seen on its diffusion variable:
the analytic mixture of treg.bench.beds on 4×8×8 "images" with an identity VAE (`PixelView`), and the measurement
M = A∘decode as the pixel operator (`BedOperator`, M's exact SVD from treg.latent_ops.DecodedOperator). Our solvers
then take their pixel path; for DDRM and DPS that is the same computation as on the bed (decode is linear;
tests/test_bench_deepinv.py checks it sample for sample), for DiffPIR it is the paper's pixel form, the prox on the
diffusion variable, which deepinv implements. deepinv gets M as a DecomposablePhysics and the mixture's exact MMSE
denoiser (`MixtureDenoiser`) in its [0, 1] convention: u = (z + 1)/2, σ_u = σ/2, y_u = (y + M1)/2 with noise σ_y/2.

How deepinv 0.5.0 differs, read in its source (site-packages/deepinv; line numbers of 0.5.0): DIFFERENCES below.
"""
import dataclasses
import inspect
import os
import platform
import shlex
import sys
import textwrap
import time

import numpy as np
import torch
from tqdm import tqdm

from treg.bench import beds as cal
from treg.bench.calibration import Experiment, ci, solve_cell, solver_config, solver_of
from treg.config import ROOT
from treg.latent_ops import DecodedOperator
from treg.runs import cli_args, write_report

TESTED_VERSION = "0.5.0"
DIFFERENCES = {  # sampler: what deepinv 0.5.0 does otherwise than the paper and our solver, with where
    "ddrm": [
        "`deepinv/sampling/diffusion.py:DDRM.forward` (lines 195 and 226) divides every injected noise by √2 "
        "(`std * torch.randn_like(x_bar) / np.sqrt(2.0)`), so its samples carry half the variance the DDRM "
        "paper's eq. 7-8 (and ours, `treg.solvers.fast.ddrm`) prescribe at each level; no comment explains it.",
        "It starts the measured coordinates at ȳ + √(σ_T² − σ_y²/s²)·n (the paper's initialisation, lines 191-195) "
        "where ours starts every coordinate from N(0, I) at ᾱ_950 ≈ 0.006, so the two are comparable in law only, "
        "not sample for sample.",
        "It calls a coefficient measured when s > σ_y (`case = mask > sigma_noise`, line 184), ours when s > 0; "
        "its levels are the `sigmas` it is given (here ours: σ_k = √((1−ᾱ_k)/ᾱ_k) at k = 950, 900, …, 0, then 0), "
        "its default `np.linspace(1, 0, 100)` would start at noise 1.",
    ],
    "diffpir": [
        "`deepinv/sampling/diffusion.py:DiffPIR.forward` (line 492) calls `L2().prox(x0, y, gamma=1/(2ρ_t))`, "
        "= argmin ‖Ax − y‖² + 2ρ_t‖x − x0‖² (`deepinv/physics/forward.py:DecomposablePhysics.prox_l2`), where the "
        "paper's data step (and `treg.solvers.peers.diffpir`) weighs ρ_t: its λ = 7 is the paper's λ = 14.",
        "It clamps the denoised estimate to [−1, 1] (line 486, `denoised.clamp(-1, 1)`): harmless on images, not "
        "on this bed, whose latents reach −1.35 and 1.92 (2-5 % of the mean's values lie outside [−1, 1]).",
        "It returns the state x, at the last level σ = √(1−ᾱ_0)/√ᾱ_0 ≈ 0.01 of its schedule, not a denoised "
        "estimate (line 518, `out = x / 2 + 0.5`), and its last step has no data step (line 488).",
        "Its schedule is DDPM's linear β from 1e-4 to 0.02 (`DiffPIR.get_alpha_beta`), visited at quadratically "
        "spaced timesteps `sqrt(linspace(0, 1000², max_iter))` (`DiffPIR.get_noise_schedule`); ours is SD's "
        "scaled-linear ᾱ at uniformly spaced timesteps. It starts from √ᾱ_T·(2Aᵀy − 1 + noise) (lines 455-478), "
        "ours from N(0, I).",
    ],
    "dps": [
        "`deepinv/sampling/diffusion.py:DPS` puts the data term inside the score "
        "(`deepinv/sampling/diffusion_sde.py:PosteriorDiffusion.score`: score − ½·weight·∇‖A D(x) − y‖/scale in "
        "[0, 1] units), which `deepinv/sampling/sde_solver.py:AncestralSolver.step` multiplies by "
        "s₀s₁σ₀²(1 − r²): the step on ∇‖y − A D(x)‖ shrinks with the level, where ours (`treg.solvers.latent.dps`) "
        "takes a constant step ζ every step. The measured steps are in the DPS table above.",
        "Its default solver is `ddpm` (`DDPMSolver`, η = 1, fresh noise every step), ours DDIM with η = 0; its VP "
        "schedule is the continuous β(t) = 0.1 + 19.9t (`VariancePreservingDiffusion`) on `linspace(1, 0, "
        "num_steps)`, ours SD's scaled-linear ᾱ.",
        "It clips the denoised estimate inside the data term to [−1, 1] in [0, 1] units (`DPSDataFidelity(clip="
        "[-1.0, 1.0])`, diffusion.py line 596), i.e. to [−3, 1] of the state: latents above 1 lose their gradient.",
    ],
}


def import_deepinv():
    """deepinv, or exit with one line saying that it does not import and how to install it."""
    try:
        import deepinv
    except Exception as err:  # noqa: BLE001  (torchvision may fail with other than ImportError)
        first = str(err).splitlines()[0][:160] if str(err) else ""
        sys.exit(f"error: deepinv does not import ({type(err).__name__}: {first}); run this benchmark in a second "
                 f"virtual environment with `pip install deepinv=={TESTED_VERSION} torchvision` (docs/benchmarks.md)")
    return deepinv


# ------------------------------------------------------------------------------------ the bed as a pixel prior

class PixelView(cal.WeightedPrior):
    """The bed's mixture with an identity VAE: a pixel prior on the 4×8×8 diffusion variable."""

    vae_scale_factor = 1

    def encode(self, x, generator=None):
        return x

    def decode(self, z):
        return z

    def decode_adjoint(self, x):
        return x


class BedOperator(torch.nn.Module):
    """M = A∘decode of the bed as a pixel operator on 4×8×8 images, with its exact SVD (DecodedOperator)."""

    def __init__(self, bed):
        super().__init__()
        self.h = DecodedOperator(bed.prior, bed.op, bed.latent_shape)

    def A(self, x):
        return self.h.A(x).to(x.dtype)

    def At(self, y):
        return self.h.At(y).to(y.dtype)

    def pinv(self, y):
        return self.h.pinv(y).to(y.dtype)

    def svd(self, like):
        return self.h.svd(like)


def pixel_view(bed):
    """The bed with its prior and operator seen on the diffusion variable (the same y, means and weights)."""
    prior = PixelView(bed.captions, means=bed.prior.means(*bed.latent_shape[1:]), std=bed.prior.std,
                      beta=bed.prior.beta, base_weights=bed.prior.log_base.exp().tolist())
    return dataclasses.replace(bed, prior=prior, op=BedOperator(bed))


class MixtureDenoiser(torch.nn.Module):
    """The exact MMSE denoiser E[z0 | z0 + σn = z] of the bed's mixture under the empty prompt, in deepinv's [0, 1]
    convention: forward(u, σ_u) with u = (z + 1)/2 and σ_u = σ/2 returns (E[z0 | z] + 1)/2. Per component
    E[z0 | z, k] = μ_k + s²/(s² + σ²)(z − μ_k), weighted by r_k ∝ π_k N(z; μ_k, (s² + σ²)I)."""

    def __init__(self, prior):
        super().__init__()
        self.mu = prior.means(8, 8).double().flatten(1)  # (K, n)
        self.std = prior.std
        self.log_pi = prior.log_weights(prior.embed([""]))[0].double()

    def forward(self, u, sigma, *args, **kwargs):
        z = 2 * u.double().flatten(1) - 1
        var = self.std ** 2 + (2 * torch.as_tensor(sigma, dtype=torch.float64, device=u.device)).reshape(-1, 1) ** 2
        log_r = self.log_pi - torch.cdist(z, self.mu) ** 2 / (2 * var)  # the log N normaliser is the same for all k
        near = torch.softmax(log_r, dim=1) @ self.mu
        mean = near + self.std ** 2 / var * (z - near)
        return ((mean + 1) / 2).view(u.shape).to(u.dtype)


def physics(dinv, view, sigma_u):
    """M as a deepinv DecomposablePhysics in [0, 1] units: A = U diag(s) Vᵀ with spectral vectors (B, 256) and
    y's noise std sigma_u."""
    d = view.op.svd(None)
    return dinv.physics.DecomposablePhysics(U=d.U, U_adjoint=d.Ut, V=d.V, V_adjoint=d.Vt, mask=d.singulars[None],
                                            noise_model=dinv.physics.GaussianNoise(sigma=sigma_u))


def patched(cls, method, replacements):
    """A subclass of `cls` whose `method` is compiled from its source with each (old, new) replaced (each `old`
    must occur exactly once), so that deepinv stays as installed and a moved source fails loudly."""
    source = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    for old, new in replacements:
        if source.count(old) != 1:
            raise RuntimeError(f"{cls.__name__}.{method}: expected {old!r} once in deepinv's source, found "
                               f"{source.count(old)}")
        source = source.replace(old, new)
    namespace = dict(sys.modules[cls.__module__].__dict__)
    exec(compile(source, f"<{cls.__name__}.{method}, patched>", "exec"), namespace)
    return type(f"{cls.__name__}Patched", (cls,), {method: namespace[method]})


NO_SQRT2 = [("std * torch.randn_like(y_bar) / np.sqrt(2.0)", "std * torch.randn_like(y_bar)"),
            ("std * torch.randn_like(x_bar) / np.sqrt(2.0)", "std * torch.randn_like(x_bar)")]
NO_CLAMP = [("x0 = denoised.clamp(-1, 1)", "x0 = denoised")]
RETURN_ESTIMATE = [("out = x / 2 + 0.5", "out = x0 / 2 + 0.5")]


# ------------------------------------------------------------------------------------------- deepinv's samplers

class Deepinv:
    """deepinv's three samplers on the pixel view of the bed, each returning latents (n, 4, 8, 8) float64."""

    def __init__(self, dinv, view):
        self.dinv, self.view = dinv, view
        self.denoiser = MixtureDenoiser(view.prior)
        self.physics = physics(dinv, view, view.sigma / 2)
        self.offset = view.op.A(torch.ones(1, *view.latent_shape, dtype=torch.float64))  # M1: y_u = (y + M1)/2

    def y_u(self, n):
        return ((self.view.y.double() + self.offset) / 2).expand(n, -1, -1, -1)

    def ddrm(self, n, cfg, sqrt2=True):
        """deepinv's DDRM at our DDRM's levels (cfg.steps, η, η_b), shipped or without its /√2."""
        skip = len(self.view.prior.alphas_cumprod) // cfg.steps
        abar = [float(self.view.prior.alphas_cumprod[skip * i].double()) for i in reversed(range(cfg.steps))]
        sigmas = np.array([((1 - a) / a) ** 0.5 for a in abar] + [0.0]) / 2  # [0, 1] units
        cls = self.dinv.sampling.DDRM if sqrt2 else patched(self.dinv.sampling.DDRM, "forward", NO_SQRT2)
        model = cls(denoiser=self.denoiser, sigmas=sigmas, eta=cfg.eta, etab=cfg.eta_b)
        return 2 * model(self.y_u(n), self.physics).double() - 1

    def diffpir(self, n, cfg, lam, clamp=True, estimate=False):
        """deepinv's DiffPIR with max_iter = cfg.steps, ζ = cfg.zeta and its λ = lam; optionally without the clamp
        and returning the last denoised estimate instead of the state."""
        changes = ([] if clamp else NO_CLAMP) + (RETURN_ESTIMATE if estimate else [])
        cls = patched(self.dinv.sampling.DiffPIR, "forward", changes) if changes else self.dinv.sampling.DiffPIR
        model = cls(model=self.denoiser, data_fidelity=self.dinv.optim.data_fidelity.L2(), sigma=self.view.sigma / 2,
                    max_iter=cfg.steps, zeta=cfg.zeta, lambda_=lam)
        return 2 * model(self.y_u(n), self.physics).double() - 1

    def dps_model(self, steps, weight, solver="ddpm", seed=0, profile=None):
        """deepinv's DPS; with `profile` = (σ_u per step, weight per step, clip), its data term weighs each step by
        the weight of the nearest σ_u (a subclass of DPSDataFidelity: not a deepinv option, a probe)."""
        model = self.dinv.sampling.DPS(denoiser=self.denoiser, num_steps=steps, weight=weight, solver=solver,
                                       rng=torch.Generator().manual_seed(seed))
        if profile is not None:
            model.data_fidelity = profiled_fidelity(self.dinv, self.denoiser, *profile)
        return model

    def dps(self, n, steps, weight, solver="ddpm", seed=0, profile=None):
        model = self.dps_model(steps, weight, solver, seed, profile)
        return 2 * model(self.y_u(n), self.physics, x_init=(n, *self.view.latent_shape), seed=seed).double() - 1

    def dps_steps(self, steps, solver="ddpm"):
        """deepinv DPS's effective step on ∇_x‖y − M D(x/scale)‖ (the state's gradient, [−1, 1] units, as our ζ) at
        each of its steps at weight 1, measured: one solver step from a probe state with the data term and one with
        weight 0, the same noise; their difference is −ζ_eff·∇ (∇ with deepinv's clip of D, [−3, 1] in state
        units). Returns (ζ_eff per step, the cosine of the difference with −∇, which is 1 when the data term
        enters as a step along ∇, and σ_u = σ_t/2 per step, the level its data term is called at)."""
        guided, plain = self.dps_model(steps, 1.0, solver), self.dps_model(steps, 0.0, solver)
        times = guided.solver.timesteps
        y = self.y_u(1)
        mu = self.denoiser.mu[:1].view(1, *self.view.latent_shape)
        zeta, cosine, levels = [], [], []
        for t0, t1 in zip(times[:-1], times[1:]):
            scale, sigma = guided.sde.scale_t(t0), guided.sde.sigma_t(t0)
            x = scale * (mu + sigma * torch.randn(mu.shape, generator=torch.Generator().manual_seed(5),
                                                  dtype=torch.float64))
            steps_taken = []
            for model in (guided, plain):
                model.solver.rng.manual_seed(7)
                steps_taken.append(model.solver.step(model.posterior, t0, t1, x.clone(), y=y,
                                                     physics=self.physics)[0])
            delta = steps_taken[0] - steps_taken[1]
            with torch.enable_grad():
                v = x.clone().requires_grad_()
                x0 = (2 * self.denoiser((v / scale + 1) / 2, sigma / 2) - 1).clamp(-3, 1)  # deepinv's clip
                loss = (self.view.y.double() - self.view.op.A(x0)).norm()
                grad, = torch.autograd.grad(loss, v)
            zeta.append(float(-(delta * grad).sum() / (grad * grad).sum()))
            cosine.append(float(-(delta * grad).sum() / (delta.norm() * grad.norm())))
            levels.append(float(sigma) / 2)
        return zeta, cosine, levels


def profiled_fidelity(dinv, denoiser, levels, weights, clip=(-1.0, 1.0)):
    """deepinv's DPSDataFidelity (norm guidance; DPS's clip [−1, 1] unless `clip` is None) whose weight at level σ_u
    is weights[i] of the nearest levels[i]."""
    levels, weights = torch.tensor(levels, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)

    class Profiled(dinv.sampling.DPSDataFidelity):
        def forward(self, x, y, physics, sigma, *args, get_model_outputs=False, **kwargs):
            out = super().forward(x, y, physics, sigma, *args, get_model_outputs=get_model_outputs, **kwargs)
            w = weights[(levels - float(sigma)).abs().argmin()]
            return (w * out[0], out[1]) if get_model_outputs else w * out

    return Profiled(denoiser=denoiser, clip=clip, weight=1.0)


# ------------------------------------------------------------------------------------------------ the statistics

def two_sample_pvalues(bed, z_a, z_b, log_weights, reference, resamples, seed=0):
    """{statistic: two-sided p-value} of the two-sample permutation test of "cells a and b are drawn from one law",
    for each statistic of cal.TESTED: the n_a + n_b solutions pooled (their statistics computed once on the
    pooled cell), relabelled by `resamples` random permutations; p = (1 + #{|permuted difference| ≥
    |observed|})/(1 + resamples), exact under the null at any n."""
    pooled, _ = cal.statistics(bed, torch.cat([z_a.double(), z_b.double()]), log_weights, reference)
    n_a, total = len(z_a), len(z_a) + len(z_b)
    rng = np.random.default_rng(seed)
    order = np.vstack([np.arange(total), np.argsort(rng.random((resamples, total)), axis=1)])  # row 0: observed
    out = {}
    for name in cal.TESTED:
        with np.errstate(invalid="ignore"):
            diff = pooled[name](order[:, :n_a]) - pooled[name](order[:, n_a:])
        observed = abs(diff[0])
        out[name] = float((1 + (np.abs(diff[1:]) >= observed - 1e-12 * max(observed, 1)).sum()) / (1 + resamples))
    return out


def agreement(pvalues):
    """(agrees, {statistic: p} of those that flag): agrees when no p-value is ≤ 0.05/len (Bonferroni)."""
    flags = cal.flagged(pvalues)
    return not flags, flags


# ------------------------------------------------------------------------------------------------------- the run

def cells(samplers):
    """[(sampler, label, implementation, what)] of every cell, ours first in each sampler's group."""
    table = {
        "ddrm": [("ours", "ours", "treg ddrm, configs/solver/ddrm.yaml (20 steps, η 0.85, η_b 1)"),
                 ("ours, other seeds", "ours", "the same on the next --seeds seeds (control: a genuine null)"),
                 ("deepinv", "deepinv", "deepinv DDRM as shipped, at our 20 levels, η 0.85, η_b 1"),
                 ("deepinv without /√2", "deepinv", "the same with its two `/ np.sqrt(2.0)` removed")],
        "diffpir": [("ours", "ours", "treg diffpir, configs/solver/diffpir.yaml (100 steps, λ 7, ζ 0.1)"),
                    ("deepinv", "deepinv", "deepinv DiffPIR as shipped: max_iter 100, λ 7 (= the paper's 14), ζ 0.1"),
                    ("deepinv λ 3.5", "deepinv", "λ 3.5: its 2ρ_t then equals our ρ_t at λ 7"),
                    ("deepinv λ 3.5, no clamp", "deepinv", "and without the clamp of x̂0 to [−1, 1]"),
                    ("deepinv λ 3.5, no clamp, estimate", "deepinv",
                     "and returning its last denoised estimate instead of the noisy state")],
        "dps": [("ours", "ours", "treg dps, configs/solver/dps.yaml (200 DDIM steps, η 0, step 1)"),
                ("deepinv", "deepinv", "deepinv DPS as shipped: 200 steps, weight 1, DDPM solver"),
                ("deepinv matched weight", "deepinv", "weight w* so that its steps sum to ours (measured below)"),
                ("deepinv matched weight, DDIM", "deepinv",
                 "its deterministic DDIM solver (η 0, as ours), weight w* of that solver"),
                ("deepinv DDIM, our step", "deepinv", "DDIM, each step's weight 1/ζ_eff so that every step is our "
                 "step 1 (a probe: per-step weights are no deepinv option)"),
                ("deepinv DDIM, our step, no clip", "deepinv", "and without the clip of D in the data term")],
    }
    return [(s, *cell) for s in samplers for cell in table[s]]


def solve(dv, view, sampler, label, n, seeds, matched):
    """Latents (n, 4, 8, 8) float64 and NFE per image of one cell."""
    cfg = solver_config(sampler, None, 0.0)
    if label.startswith("ours"):
        shift = n if label == "ours, other seeds" else 0
        z, nfe, _ = solve_cell(view, solver_of(sampler), cfg, "", [s + shift for s in seeds])
        return z, nfe
    if sampler == "ddrm":
        return dv.ddrm(n, cfg, sqrt2="/√2" not in label), cfg.steps + 1
    if sampler == "diffpir":
        lam = 3.5 if "3.5" in label else cfg.lam
        return dv.diffpir(n, cfg, lam, clamp="no clamp" not in label, estimate="estimate" in label), cfg.steps
    solver = "ddim" if "DDIM" in label else "ddpm"
    step = matched[solver]
    weight = step["matched_weight"] if "matched" in label else 1.0
    clip = None if "no clip" in label else (-1.0, 1.0)
    profile = (step["levels"], [cfg.step_size / z for z in step["zeta"]], clip) if "our step" in label else None
    return dv.dps(n, cfg.steps, weight, solver, seed=seeds[0], profile=profile), cfg.steps - 1  # steps between times


def run(args):
    """The benchmark for flags.deepinv's arguments: writes the report and prints it."""
    dinv = import_deepinv()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    bed = cal.build_bed(ROOT, args.seed)
    view = pixel_view(bed)
    dv = Deepinv(dinv, view)
    seeds = list(range(args.seed, args.seed + args.seeds))
    ex = Experiment(bed, seeds)
    log_w, reference = ex.target("", 0.0)
    report = {"rows": [ex.exact_row("", 0.0)], "pairs": [], "dps_steps": {}}
    if "dps" in args.samplers:
        cfg = solver_config("dps", None, 0.0)
        ours = cfg.step_size * cfg.steps  # ours: step_size on each of its steps
        for solver in ("ddpm", "ddim"):
            zeta, cosine, levels = dv.dps_steps(cfg.steps, solver)
            report["dps_steps"][solver] = {"steps": cfg.steps, "zeta": zeta, "cosine": cosine, "levels": levels,
                                           "sum": sum(zeta), "ours_sum": ours, "ratio": ours / sum(zeta),
                                           "matched_weight": ours / sum(zeta)}
    latents = {}
    todo = cells(args.samplers)
    for index, (sampler, label, impl, what) in enumerate(tqdm(todo, file=sys.stderr, unit="cell")):
        torch.manual_seed(args.seed + 7919 * (index + 1))  # deepinv draws from torch's global generator
        start = time.perf_counter()
        z, nfe = solve(dv, view, sampler, label, args.seeds, seeds, report["dps_steps"])
        seconds = (time.perf_counter() - start) / args.seeds
        if not torch.isfinite(z).all():
            raise FloatingPointError(f"{sampler} {label}: non-finite solution")
        z = z.view(-1, *bed.latent_shape)
        latents[sampler, label] = z
        fns, runs = cal.statistics(bed, z, log_w, reference)
        report["rows"].append({"sampler": sampler, "cell": label, "impl": impl, "what": what, "nfe": nfe,
                               "seconds": seconds, "stats": cal.intervals(fns, len(z)), "runs": runs})
        if label != "ours":
            p = two_sample_pvalues(bed, latents[sampler, "ours"], z, log_w, reference, args.permutations, seed=index)
            agrees, flags = agreement(p)
            report["pairs"].append({"sampler": sampler, "a": "ours", "b": label, "pvalues": p, "agrees": agrees,
                                    "flagged_by": flags})
    seconds = time.perf_counter() - begin
    text = markdown(report, args, seconds, machine(dinv))
    write_report(args.out, text + "\n", {"settings": cli_args(args) | {"seconds": seconds, "task": cal.TASK,
                                                                      "machine": machine(dinv)}, **report})
    print(text)


def machine(dinv):
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "deepinv": getattr(dinv, "__version__", "unknown")}


def markdown(report, args, seconds, host):
    """The report: header (command, seeds, wall time, machine), one table per sampler, the agreement tests, the
    DPS step measurement and deepinv's differences from the source."""
    n = args.seeds
    lines = [
        "# deepinv 0.5 side by side: DDRM, DiffPIR, DPS on the calibration bed", "",
        f"`python -m treg bench deepinv {shlex.join(args.argv)}`".replace(" `", "`") + f": {n} seeds per cell, "
        f"{seconds / 60:.1f} min on {args.threads} CPU thread(s); {host['platform']} ({host['processor']}, "
        f"{host['cpus']} CPUs), Python {host['python']}, torch {host['torch']}, deepinv {host['deepinv']}.", "",
        "Bed: treg/bench/beds.py (×8 SR at 64², σ = 0.01, exact posterior weights 0.6/0.3/0.1), seen as a pixel prior "
        "on its 4×8×8 diffusion variable with M = A∘decode as the operator (module docstring of "
        "treg/bench/deepinv.py); the same y for every cell, w = 0 (empty prompt). Each value is the statistic on "
        f"all {n} seeds with its 95 % bootstrap interval ({cal.BOOTSTRAP} resamples); `exact` is {n} exact "
        "posterior draws.", ""]
    rows = {}
    for r in report["rows"]:
        rows.setdefault(r.get("sampler", "exact"), []).append(r)
    for sampler in args.samplers:
        lines += [f"## {sampler}", "",
                  "| cell | NFE | TV | spread meas. | spread null | residual | residual W1 | rel. L2 | what |",
                  "|---" * 9 + "|"]
        for r in rows["exact"] + rows.get(sampler, []):
            s = r["stats"]
            lines.append(f"| {r.get('cell', 'exact')} | {r['nfe']} | {ci(s['tv'])} | {ci(s['spread_measured'])} | "
                         f"{ci(s['spread_null'])} | {ci(s['residual'])} | {ci(s['residual_w1'])} | "
                         f"{ci(s['rel_l2'], 3)} | {r.get('what', 'exact posterior draws')} |")
        lines.append("")
    lines += ["## Agreement with ours", "",
              f"Two-sample permutation p-values ({args.permutations} relabellings of the pooled 2×{n} solutions); a "
              f"pair agrees when no p ≤ {cal.FAMILY_LEVEL}/{len(cal.TESTED)} = "
              f"{cal.FAMILY_LEVEL / len(cal.TESTED):.4f} (Bonferroni).", "",
              "| sampler | ours against | " + " | ".join(cal.TESTED) + " | agrees |", "|---" * (len(cal.TESTED) + 3)
              + "|"]
    for pair in report["pairs"]:
        verdict = "yes" if pair["agrees"] else "no: " + ", ".join(pair["flagged_by"])
        lines.append(f"| {pair['sampler']} | {pair['b']} | " + " | ".join(f"{pair['pvalues'][k]:.4f}"
                                                                       for k in cal.TESTED) + f" | {verdict} |")
    if report["dps_steps"]:
        lines += ["", "## DPS: deepinv's step on ∇‖y − A D(x)‖", "",
                  "Measured on each of deepinv DPS's steps at weight 1: one solver step with the data term minus one "
                  "with weight 0 (the same noise), projected on −∇_x‖y − M D(x)‖ at a probe state; ours takes step "
                  "1 on each of its steps.", "",
                  "| solver | steps | cosine with −∇ | Σ ζ_eff | ours Σ | weight 1 is weaker by | w* | first | "
                  "middle | last |", "|---" * 10 + "|"]
        for solver, step in report["dps_steps"].items():
            zeta = step["zeta"]
            lines.append(f"| {solver} | {len(zeta)} | {min(step['cosine']):.6f}–{max(step['cosine']):.6f} | "
                         f"{step['sum']:.3f} | {step['ours_sum']:g} | {step['ratio']:.1f}× | "
                         f"{step['matched_weight']:.2f} | {zeta[0]:.2e} | {zeta[len(zeta) // 2]:.2e} | "
                         f"{zeta[-1]:.2e} |")
    lines += ["", "## How deepinv 0.5.0 differs (its source)", ""]
    for sampler in args.samplers:
        lines += [f"- **{sampler}**: " + " ".join(DIFFERENCES[sampler])]
    return "\n".join(lines)


def main(argv=None):
    from treg.bench import flags
    run(flags.deepinv(argv))


if __name__ == "__main__":
    main()
