"""Wall time per model component, call counts, NFE and peak memory, measured around the prior and the operator.

The solvers are untouched: `Profiler.wrap` returns proxies that time the named methods and delegate the rest.
"""
import math
import os
import resource
import time
from collections import defaultdict

import torch

from treg.config import ConfigError

PRIOR_PARTS = {"eps": "unet", "decode": "vae_decode", "encode": "vae_encode", "image_features": "clip_image",
               "embed": "text_encoder"}
OPERATOR_PARTS = {"A": "operator", "At": "operator", "pinv": "operator"}


class _Proxy:
    def __init__(self, target, timed):
        self._target = target
        self.__dict__.update(timed)

    def __getattr__(self, name):
        return getattr(self._target, name)


class _Mark(torch.autograd.Function):
    """Identity whose backward calls `callback()` before passing the gradient on."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


class Profiler:
    """Accumulates seconds and calls per component and the latents the UNet saw; `reset()` before each solve,
    `report(wall, images)` after it."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.accelerated = self.device.type != "cpu" and torch.accelerator.is_available()
        self.reset()

    def reset(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.latents = 0  # noise predictions: every latent in an eps batch counts one, so CFG counts two
        if self.accelerated:
            torch.accelerator.reset_peak_memory_stats(self.device)

    def _sync(self):
        if self.accelerated:
            torch.accelerator.synchronize(self.device)

    def _timed(self, label, fn):
        backward = f"{label}_backward"

        def call(*args, **kwargs):
            # With autograd on, the inputs and the output pass through identity nodes whose backward marks the
            # moment the gradient enters and leaves this call: the marked inputs are fresh tensors only this call
            # uses, so their gradient is complete exactly when the backward through the component is.
            grad_inputs = torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args)
            if grad_inputs:
                mark = []

                def reached_output():
                    self._sync()
                    mark[:] = [time.perf_counter()]
                    self.calls[backward] += 1

                def reached_input():
                    self._sync()
                    now = time.perf_counter()
                    self.seconds[backward] += now - mark[0]
                    mark[0] = now  # with several inputs, the last one closes the interval

                args = [_Mark.apply(a, reached_input) if torch.is_tensor(a) and a.requires_grad else a for a in args]
            self._sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.seconds[label] += time.perf_counter() - start
            self.calls[label] += 1
            if label == "unet":
                self.latents += len(args[0])
            return _Mark.apply(out, reached_output) if grad_inputs and out.requires_grad else out
        return call

    def wrap(self, target, parts):
        """A proxy of `target` whose methods named in `parts` ({method: label}) are timed."""
        return _Proxy(target, {m: self._timed(label, getattr(target, m)) for m, label in parts.items()
                               if hasattr(target, m)})

    def peak_memory_mb(self):
        """Peak allocated device memory since reset() on an accelerator; the process's peak RSS on CPU."""
        if self.accelerated:
            return torch.accelerator.max_memory_allocated(self.device) / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    def report(self, wall, images):
        """{'seconds': {component: s, ..., 'other': s}, 'calls': {...}, 'nfe': per image, 'peak_memory_mb': ...}
        for one solve of `images` images."""
        seconds = {k: round(v, 4) for k, v in sorted(self.seconds.items())}
        seconds["other"] = round(max(wall - sum(self.seconds.values()), 0.0), 4)
        return {"seconds": seconds, "calls": dict(sorted(self.calls.items())), "nfe": self.latents // images,
                "peak_memory_mb": round(self.peak_memory_mb(), 1)}


# Working memory per image pixel of a solve beyond the model weights, measured as the growth of peak RSS on the
# analytic prior (treg with SR x16: 434 / 709 / 1367 MB at 512² / 1024² / 2048²); a diffusers prior adds its VAE's
# full-resolution activations (memory_needed).
BYTES_PER_PIXEL = 400


def available_memory(device):
    """Bytes free on `device`: the accelerator's free memory, or the system's available memory on cpu."""
    if device.type != "cpu":
        return torch.accelerator.get_memory_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            return int(next(line for line in info if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else math.inf


def memory_needed(prior, image_size, batch_size):
    """A lower estimate of the bytes a batch's solve allocates beyond the weights: the measured working set per
    pixel, plus for a diffusers prior the VAE's full-resolution activations (4 live maps of its widest channels)."""
    per_pixel = BYTES_PER_PIXEL
    vae = getattr(prior, "vae", None)
    if vae is not None:
        per_pixel += 4 * vae.config.block_out_channels[0] * torch.finfo(vae.dtype).bits // 8
    return batch_size * image_size ** 2 * per_pixel


def check_memory(prior, image_size, batch_size, device):
    """ConfigError if a batch's solve clearly cannot fit in `device`'s free memory (memory_needed is a lower bound)."""
    need, have = memory_needed(prior, image_size, batch_size), available_memory(device)
    if need > have:
        raise ConfigError(f"image_size {image_size} with batch size {batch_size} needs about {need / 2 ** 30:.1f} GiB "
                          f"on {device}, {have / 2 ** 30:.1f} GiB is free; use a smaller --image_size or --batch_size")
