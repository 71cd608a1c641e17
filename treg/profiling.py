"""Wall time per model component, call counts (NFE) and peak memory, measured around the prior and the operator.

The solvers are untouched: `Profiler.wrap` returns proxies that time the named methods and delegate the rest.
"""
import resource
import time
from collections import defaultdict

import torch

PRIOR_PARTS = {"eps": "unet", "decode": "vae_decode", "encode": "vae_encode", "image_features": "clip_image",
               "embed": "text_encoder"}
OPERATOR_PARTS = {"A": "operator", "At": "operator", "pinv": "operator"}


class _Proxy:
    def __init__(self, target, timed):
        self._target = target
        self.__dict__.update(timed)

    def __getattr__(self, name):
        return getattr(self._target, name)


class Profiler:
    """Accumulates seconds and calls per component; `reset()` between images, `report(wall)` after each."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.accelerated = self.device.type != "cpu" and torch.accelerator.is_available()
        self.reset()

    def reset(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        if self.accelerated:
            torch.accelerator.reset_peak_memory_stats(self.device)

    def _sync(self):
        if self.accelerated:
            torch.accelerator.synchronize(self.device)

    def _timed(self, label, fn):
        def call(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.seconds[label] += time.perf_counter() - start
            self.calls[label] += 1
            return out
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

    def report(self, wall):
        """{'seconds': {component: s, ..., 'other': s}, 'calls': {...}, 'peak_memory_mb': ...} for one solve."""
        seconds = {k: round(v, 4) for k, v in sorted(self.seconds.items())}
        seconds["other"] = round(max(wall - sum(self.seconds.values()), 0.0), 4)
        return {"seconds": seconds, "calls": dict(sorted(self.calls.items())),
                "peak_memory_mb": round(self.peak_memory_mb(), 1)}
