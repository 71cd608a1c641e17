"""DDIM helpers against diffusers' DDIMScheduler, and the official TReg schedule values."""
import pytest
import torch
from diffusers import DDIMScheduler

from treg.diffusion import ddim_step, guided_eps as cfg, randn, schedule, timesteps, tweedie


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


@pytest.mark.parametrize("shift", [True, False])
def test_schedule_reads_the_given_alphas_at_t_minus_the_shift_on_their_own_grid(shift):
    """A 100-step training schedule ᾱ_i = 1 − i/200 (any array works): 10 steps of skip 10 at t = 91, 81, …, 1,
    ᾱ = ᾱ_{t−s}, ᾱ' = ᾱ_{t−10−s} (s = 1 with the official shift), and ᾱ_0 where that index is negative."""
    ac = 1 - torch.arange(100, dtype=torch.float32) / 200
    s = 1 if shift else 0
    expected = [(t, 1 - (t - s) / 200, 1 - (t - 10 - s) / 200 if t - 10 - s >= 0 else 1.0)
                for t in range(91, 0, -10)]
    got = schedule(ac, 10, official_shift=shift)
    assert [t for t, _, _ in got] == [t for t, _, _ in expected]
    for (_, a, a_prev), (_, a_ref, prev_ref) in zip(got, expected):
        assert a == pytest.approx(a_ref, abs=1e-7) and a_prev == pytest.approx(prev_ref, abs=1e-7)
    assert all(isinstance(v, float) for _, a, p in got for v in (a, p))
    assert schedule(ac, 10) == schedule(ac, 10, official_shift=True)  # the official shift is the default


def test_ddim_step_with_sigma_adds_the_scaled_noise_and_shrinks_the_eps_term():
    z0, eps, noise = torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([2.0])
    a_prev, sigma = 0.64, 0.3
    expected = 0.8 * 0.5 + (1 - 0.64 - 0.09) ** 0.5 * -1.0 + 0.3 * 2.0
    assert ddim_step(z0, eps, a_prev, sigma, noise).item() == pytest.approx(expected, rel=1e-6)
    assert ddim_step(z0, eps, a_prev).item() == pytest.approx(0.8 * 0.5 - 0.6, rel=1e-6)
    assert tweedie(torch.tensor([0.7]), eps, 0.36).item() == pytest.approx((0.7 + 0.8) / 0.6, rel=1e-6)


def test_randn_checks_the_generator_count_and_draws_on_the_generators_device():
    with pytest.raises(ValueError, match="^2 generators for a batch of 3$"):
        randn((3, 1), [torch.Generator(), torch.Generator()], "cpu")
    x = randn((2, 3), torch.Generator().manual_seed(4), "meta")
    assert x.device.type == "meta" and x.shape == (2, 3) and x.dtype == torch.float32
    torch.testing.assert_close(randn((2, 3), torch.Generator().manual_seed(4), "cpu"),
                               torch.randn((2, 3), generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(5)
    unseeded = randn((2, 3), None, "cpu")
    torch.manual_seed(5)
    assert torch.equal(unseeded, torch.randn(2, 3))  # no generator: torch's global one


def test_grid_bounds_one_and_num_train_steps_and_the_clamped_top():
    """1 step is t = 1; 1000 steps (the default num_train) start at the clamped t = 999, and their first
    levels are ᾱ_999 → ᾱ_998 with the official shift and ᾱ_999 → ᾱ_999 (the no-op) without it."""
    assert timesteps(1) == [1]
    grid = timesteps(1000)
    assert len(grid) == 1000 and grid[:3] == [999, 999, 998] and grid[-1] == 1
    ac = sd_scheduler().alphas_cumprod
    for shift, prev in [(True, 998), (False, 999)]:
        first = schedule(ac, 1000, official_shift=shift)[0]
        assert first == (999, pytest.approx(ac[999].item(), rel=1e-12), pytest.approx(ac[prev].item(), rel=1e-12))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=rf"^steps must be in \[1, 1000\], got {bad}$"):
            timesteps(bad)


class TimeAwarePrior:
    def eps(self, z, t, e):
        return z * t + e  # depends on z, t and the embedding, per batch element


@pytest.mark.parametrize("w", [0.0, 1.0, 3.5])
def test_cfg_passes_t_and_splits_a_batch_of_three(w):
    z = torch.arange(3 * 2, dtype=torch.float64).reshape(3, 2)
    uc, c = torch.full((3, 2), -1.0, dtype=torch.float64), torch.arange(6, dtype=torch.float64).reshape(3, 2)
    expected = (z * 7 + uc) + w * ((z * 7 + c) - (z * 7 + uc))
    torch.testing.assert_close(cfg(TimeAwarePrior(), z, 7, uc, c, w), expected)


def test_randn_draws_on_the_generators_device_whatever_torchs_default_device():
    """The same seed gives the same noise whether or not the caller set a default device (here meta)."""
    reference = torch.randn((2, 3), generator=torch.Generator().manual_seed(4))
    with torch.device("meta"):
        single = randn((2, 3), torch.Generator().manual_seed(4), "cpu")
        per_image = randn((2, 3), [torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)], "cpu")
    torch.testing.assert_close(single, reference)
    torch.testing.assert_close(per_image, torch.cat([reference[:1], reference[:1]]))
    assert randn((2, 3), [torch.Generator(), torch.Generator()], "meta").device.type == "meta"
