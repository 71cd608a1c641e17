"""The profiler attributes forward and backward time to the component that spent it, and counts NFE per image."""
import time

import torch

from treg.profiling import PRIOR_PARTS, Profiler


class SlowBackward(torch.autograd.Function):
    """Identity whose backward pass sleeps: a component with a known backward cost."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.2)
        return grad


class FakePrior:
    def eps(self, z, t, e):
        return 0.5 * z + e.mean()

    def decode(self, z):
        return SlowBackward.apply(z)


def test_backward_time_goes_to_the_component_and_nfe_counts_latents():
    profiler = Profiler("cpu")
    prior = profiler.wrap(FakePrior(), PRIOR_PARTS)
    z, e = torch.randn(2, 4, 8, 8, requires_grad=True), torch.zeros(2, 3)
    start = time.perf_counter()
    for _ in range(2):  # two "steps", one CFG-style eps call on a doubled batch each
        eps = prior.eps(torch.cat([z, z]), 0, torch.cat([e, e]))
        torch.autograd.grad(prior.decode(eps).sum(), z)
    report = profiler.report(time.perf_counter() - start, images=2)
    assert report["nfe"] == 4  # 2 steps × 2 latents per image
    assert report["calls"]["vae_decode_backward"] == 2 and report["calls"]["unet_backward"] == 2
    assert 0.4 <= report["seconds"]["vae_decode_backward"] < 0.6
    assert report["seconds"]["unet_backward"] < 0.1 and report["seconds"]["other"] < 0.1
    profiler.reset()
    assert not profiler.seconds and not profiler.latents
