"""Pixel priors: a tiny UNet2DModel folder through load_prior and solve.py, and the analytic pixel prior's exact ε
and exact posterior."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from treg.operators import build_operator
from treg.priors.analytic import load_image
from treg.priors.load import load_prior
from treg.priors.pixel import AnalyticPixelPrior, PixelDiffusion
from treg.priors.posterior import exact_posterior
from treg.priors.tiny import build_tiny_pixel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_pixel(tmp_path_factory):
    return build_tiny_pixel(tmp_path_factory.mktemp("tiny-pixel"))


def test_pixel_folder_loads_as_an_unconditional_identity_vae_prior(tiny_pixel):
    prior = load_prior(str(tiny_pixel), "cpu", torch.float32)
    assert isinstance(prior, PixelDiffusion) and prior.latent_channels == 3 and prior.vae_scale_factor == 1
    from diffusers import DDPMScheduler
    torch.testing.assert_close(prior.alphas_cumprod, DDPMScheduler(beta_schedule="linear").alphas_cumprod)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(prior.encode(x), x) and torch.equal(prior.decode(x), x)
    e = prior.embed(["a photo of a cat", ""])
    eps = prior.eps(x, 500, e)
    assert eps.shape == x.shape and torch.isfinite(eps).all() and eps.abs().max() > 0
    assert torch.equal(eps, prior.eps(x, 500, torch.randn(2, 77, 32)))  # the text is ignored
    assert not torch.allclose(eps, prior.eps(x, 100, e))  # the timestep is not


def test_pixel_prior_with_prompt_warns_and_with_adaptive_negation_fails(tiny_pixel, tmp_path):
    base = [sys.executable, "solve.py", "--model", str(tiny_pixel), "--image_size", "32", "--img_path",
            "samples/cat_1.jpg", "--task_config", "configs/task/super-resolution-x8.yaml", "--device", "cpu"]
    steps = tmp_path / "ddim.yaml"
    steps.write_text("solver: ddim\nsteps: 2\n")
    done = subprocess.run(base + ["--prompt", "a cat", "--solver_config", str(steps), "--workdir", str(tmp_path / "a")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: " in done.stderr and "unconditional pixel model" in done.stderr
    assert (tmp_path / "a/recon/00000-a cat.png").exists()
    done = subprocess.run(base + ["--use_AN", "--workdir", str(tmp_path / "b")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        f"error: adaptive negation needs text and '{tiny_pixel}' has none; drop --use_AN"]
    assert not (tmp_path / "b").exists()


def test_analytic_pixel_prior_eps_is_the_scaled_score():
    prior = AnalyticPixelPrior.from_folder()
    e = prior.embed(["a cup of coffee"]).double()
    g = torch.Generator().manual_seed(0)
    mu = prior.means(16, 16).double()
    for t in (10, 400, 900):
        a = prior.alphas_cumprod[t].item()
        z = (a ** 0.5 * mu[[3]] + (1 - a) ** 0.5 * torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64))
        z.requires_grad_()
        (score,) = torch.autograd.grad(prior.log_prob_t(z, t, e).sum(), z)
        torch.testing.assert_close(prior.eps(z, t, e), -((1 - a) ** 0.5) * score, rtol=1e-9, atol=1e-9)


def test_analytic_pixel_components_share_the_sr16_measurement_and_the_text_picks_the_detail():
    prior = AnalyticPixelPrior.from_folder()
    op = build_operator("super_resolution", 64, scale=16).double()
    mu = prior.means(64, 64).double()
    assert mu.shape == (16, 3, 64, 64) and prior.shared_scales[(64, 64)] == 16
    x = torch.cat([load_image(p, 64) for p in prior.image_paths]).double()
    seen = op.A(mu).view(4, 4, 3, 4, 4)
    torch.testing.assert_close(seen, op.A(x)[:, None].expand_as(seen), rtol=0, atol=1e-6)  # means are float32
    y = op.A(x[:1]) + 0.01 * torch.randn(op.A(x[:1]).shape, generator=torch.Generator().manual_seed(1),
                                          dtype=torch.float64)
    post = exact_posterior(prior, op, y, "a cup of coffee on a wooden table", 0.01)
    w = post.log_weights.exp().view(4, 4)
    assert w[0].sum() > 0.999 and w[0].argmax() == 1  # coffee is image 1 of captions.yaml
