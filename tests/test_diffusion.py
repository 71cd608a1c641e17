"""DDIM helpers against diffusers' DDIMScheduler, and the official TReg schedule values."""
import pytest
import torch
from diffusers import DDIMScheduler

from treg.diffusion import cfg, ddim_step, randn, schedule, timesteps, tweedie


def sd_scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


@pytest.mark.parametrize("steps", [10, 50, 200])
def test_timesteps_match_diffusers(steps):
    s = sd_scheduler()
    s.set_timesteps(steps)
    assert timesteps(steps) == s.timesteps.tolist()


def test_ddim_step_matches_diffusers_without_shift():
    s = sd_scheduler()
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for t, a, a_prev in schedule(s.alphas_cumprod, 10, official_shift=False):
        eps = torch.randn(z.shape, generator=g)
        expected = s.step(eps, t, z).prev_sample
        z0 = tweedie(z, eps, a)
        assert torch.allclose(z0, s.step(eps, t, z).pred_original_sample, atol=1e-5)
        z = ddim_step(z0, eps, a_prev)
        assert torch.allclose(z, expected, atol=1e-5)


def test_official_shift_values():
    """The ᾱ, ᾱ' the official code uses at steps 0, 90 and 168 of 200 (treg-official.md §6.3) and its no-op end."""
    steps = schedule(sd_scheduler().alphas_cumprod, 200, official_shift=True)
    for i, t, a, a_prev in [(0, 996, 0.0049, 0.0052), (90, 546, 0.2198, 0.2257), (168, 156, 0.8207, 0.8278)]:
        assert steps[i][0] == t
        assert steps[i][1] == pytest.approx(a, abs=5e-5) and steps[i][2] == pytest.approx(a_prev, abs=5e-5)
    t, a, a_prev = steps[-1]
    assert t == 1 and a == a_prev == pytest.approx(0.99915, abs=1e-5)


class CountingPrior:
    def __init__(self):
        self.batches = []

    def eps(self, z, t, e):
        self.batches.append(len(z))
        return z * 0 + e[:, :1, :1, None]  # ε depends only on the embedding: ε_uc = 1, ε_c = 3


@pytest.mark.parametrize("w, value, batch", [(0.0, 1.0, 1), (1.0, 3.0, 1), (2.5, 1 + 2.5 * 2, 2)])
def test_cfg_weights(w, value, batch):
    prior = CountingPrior()
    z = torch.zeros(1, 4, 2, 2)
    uc, c = torch.ones(1, 3, 1), 3 * torch.ones(1, 3, 1)
    out = cfg(prior, z, 5, uc, c, w)
    assert torch.allclose(out, torch.full_like(z, value))
    assert prior.batches == [batch]  # w = 0 and w = 1 skip the branch they do not need


def test_randn_per_image_generators_are_batch_independent():
    alone = randn((1, 4, 3, 3), torch.Generator().manual_seed(7), "cpu")
    batch = randn((2, 4, 3, 3), [torch.Generator().manual_seed(1), torch.Generator().manual_seed(7)], "cpu")
    assert torch.equal(batch[1:], alone)
    assert not torch.equal(batch[:1], alone)
