"""Inversion inside the solvers: the `--round_trip` diagnostic and the experimental `--init inversion` warm start."""
import dataclasses
import json

import pytest
import torch

import solve
from treg.config import SAMPLES
from treg.diffusion import schedule
from treg.operators import build_operator
from treg.priors.analytic import AnalyticPrior, load_image
from treg.solvers.inversion import InversionConfig, rnri, round_trip_psnr, warm_start
from treg.solvers.latent import DPSConfig, TRegConfig, dps, treg


@pytest.fixture(scope="module")
def bed():
    """The analytic prior, ×16 SR at 64 px of the cat with σ_y = 0.01, prompt and null embeddings."""
    prior = AnalyticPrior.from_folder()
    op = build_operator("super_resolution", 64, scale=16)
    x = load_image(SAMPLES / "cat_1.jpg", 64)
    y = op.A(x) + 0.01 * torch.randn(op.A(x).shape, generator=torch.Generator().manual_seed(0))
    uc, c = prior.embed(["out of focus, depth of field", "a photo of a cat"]).chunk(2)
    return prior, op, x, y, c, uc


def test_round_trip_psnr_tells_prior_images_from_noise(bed):
    """A sample of the prior regenerates almost exactly, the better the inversion solves its equation (DDIM
    inversion 62 dB, RNRI 74 dB, FPI-40 158 dB measured); an image of white noise, far from every component, does
    not (14–22 dB): the diagnostic measures how regenerable a solution is under the prompt."""
    prior, _, _, _, c, uc = bed
    sample = prior.decode(prior.means(8, 8)[:1])
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scores = {method: [round_trip_psnr(prior, img, InversionConfig(method=method, iters=iters), c=c, uc=uc).item()
                       for img in (sample, noise)] for method, iters in (("ddim", 1), ("rnri", 2), ("fpi", 40))}
    assert 50 < scores["ddim"][0] < scores["rnri"][0] < 80 < scores["fpi"][0], scores
    assert all(off < 25 for _, off in scores.values()), scores


def test_solve_reports_round_trip_beside_the_metrics(tmp_path):
    workdir = tmp_path / "run"
    solve.main(["--model", "analytic", "--image_size", "64", "--img_path", str(SAMPLES / "cat_1.jpg"),
                "--prompt", "a photo of a cat", "--compare", "treg,ddim", "--round_trip", "--workdir", str(workdir)])
    record = json.loads((workdir / "records/00000.json").read_text())["results"]
    assert all(r["metrics"]["round_trip_psnr"] > 30 for r in record.values())
    assert "round_trip_psnr" in (workdir / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("solver, config", [(treg, TRegConfig), (dps, DPSConfig)])
def test_warm_start_starts_at_init_t_from_the_inversion(bed, solver, config):
    """With init_invert_t = init_t (deterministic) the solver's first step is the first with t ≤ init_t and its latent
    is the RNRI inversion of encode(A⁺y) (no noise added, whatever the seed); the plain start runs every step."""
    prior, op, _, y, c, uc = bed
    cfg = config(steps=20, cfg_guidance=2.0, init="inversion", init_t=500, init_invert_t=500)
    first = next(i for i, (t, _, _) in enumerate(schedule(prior.alphas_cumprod, 20)) if t <= 500)
    z, start = warm_start(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(3))
    z_other_seed, _ = warm_start(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(4))
    expected = rnri(prior, prior.encode(op.pinv(y)), InversionConfig(steps=20, start_step=first), c=c, uc=uc)
    assert start == first and torch.equal(z, z_other_seed) and torch.allclose(z, expected, atol=1e-6)
    seen = []
    solver(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(3), callback=seen.append)
    assert [info["i"] for info in seen] == list(range(first, 20))
    seen = []
    solver(prior, op, y, dataclasses.replace(cfg, init="noise"), c=c, uc=uc, callback=seen.append)
    assert len(seen) == 20


def test_warm_start_renoises_from_init_invert_t(bed):
    """init_invert_t < init_t: the inversion stops earlier and fresh noise carries it to init_t, so two seeds
    give different starts with the variance of q(z_t | z_s): ‖Δz‖² ≈ 2·(1 − ᾱ_t/ᾱ_s)·D."""
    prior, op, _, y, c, uc = bed
    cfg = TRegConfig(steps=20, init="inversion", init_t=700, init_invert_t=200)
    z1, first = warm_start(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(3))
    z2, _ = warm_start(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(4))
    triples = schedule(prior.alphas_cumprod, 20)
    stop = next(i for i, (t, _, _) in enumerate(triples) if t <= 200)
    expected = 2 * (1 - triples[first][1] / triples[stop][1]) * z1.numel()
    assert 0.7 < (z1 - z2).pow(2).sum().item() / expected < 1.3


def test_init_flags_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--init does not apply to solver 'psld'"):
        solve.main(["--model", "analytic", "--solver_config", "configs/solver/psld.yaml", "--init", "inversion",
                    "--img_path", str(SAMPLES / "cat_1.jpg"), "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="'init_t' must be in"):
        solve.main(["--model", "analytic", "--init", "inversion", "--init_t", "1000",
                    "--img_path", str(SAMPLES / "cat_1.jpg"), "--workdir", str(tmp_path)])


def test_renoised_inversion_is_the_inversion_plus_forward_noise(bed):
    """At the inversion's own level nothing is added (the RNRI latent itself); at a noisier level the result is
    √(ᾱ/ᾱ_s)·z_s + √(1 − ᾱ/ᾱ_s)·n with n drawn from the generator after the inversion."""
    from treg.solvers.inversion import renoised_inversion
    prior, op, _, y, c, uc = bed
    inversion = InversionConfig(steps=50, official_shift=False, start_step=45)
    z0 = prior.encode(op.pinv(y))
    z_s = rnri(prior, z0, inversion, c=c, uc=uc)
    reached = schedule(prior.alphas_cumprod, 50, False)[45][1]
    assert torch.equal(renoised_inversion(prior, z0, inversion, reached, c=c, uc=uc,
                                          generator=torch.Generator().manual_seed(3)), z_s)
    level = float(prior.alphas_cumprod[566])
    got = renoised_inversion(prior, z0, inversion, level, c=c, uc=uc, generator=torch.Generator().manual_seed(3))
    n = torch.randn(z_s.shape, generator=torch.Generator().manual_seed(3))
    keep = level / reached
    assert torch.allclose(got, keep ** 0.5 * z_s + (1 - keep) ** 0.5 * n, atol=1e-6)
    with pytest.raises(Exception, match="re-noising only adds noise"):
        renoised_inversion(prior, z0, inversion, reached * 1.01, c=c, uc=uc)


def test_cci_starts_from_the_inversion_when_asked(bed, monkeypatch):
    """cci with init = inversion begins at inverted_start's latent instead of μ·H⁺y + σ·n, and still fits y."""
    from treg.solvers import fast
    prior, op, _, y, c, uc = bed
    cfg = fast.CCIConfig(cfg_guidance=5.0, sigma_y=0.01, init="inversion")
    starts = []
    real = fast.inverted_start
    monkeypatch.setattr(fast, "inverted_start", lambda *a, **k: starts.append(real(*a, **k)) or starts[-1])
    first = []
    x = fast.cci(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(0),
                 callback=lambda info: first.append(info["z0"]) if info["i"] == 0 else None)
    assert len(starts) == 1 and starts[0].shape == (1, 4, 8, 8)
    plain = []
    fast.cci(prior, op, y, dataclasses.replace(cfg, init="noise"), c=c, uc=uc,
             generator=torch.Generator().manual_seed(0),
             callback=lambda info: plain.append(info["z0"]) if info["i"] == 0 else None)
    assert not torch.allclose(first[0], plain[0])
    floor = 0.01 * y.numel() ** 0.5
    assert (y - op.A(x)).norm() < 1.5 * floor


@pytest.mark.parametrize("solver, config", [(treg, TRegConfig), (dps, DPSConfig)])
def test_renoised_warm_start_draws_from_the_solvers_generator(bed, solver, config):
    """The re-noised start (init_invert_t < init_t) draws its noise from the generator given to the solver: the same
    seed gives the same image, whatever the global RNG did in between; another seed another image."""
    prior, op, _, y, c, uc = bed
    cfg = config(steps=10, init="inversion", init_t=300, init_invert_t=100)
    run = lambda seed: solver(prior, op, y, cfg, c=c, uc=uc, generator=torch.Generator().manual_seed(seed))
    first = run(3)
    torch.randn(100)  # the global RNG moves on
    assert torch.equal(run(3), first) and not torch.allclose(run(4), first)
