"""The prior interface, a leaf that every prior module and the loader import (no circle between them).

Every prior exposes the same small interface, which is all the solvers ever see:

    alphas_cumprod: Tensor            # (T,) float32, the training noise schedule
    latent_channels, vae_scale_factor # latent shape is (B, latent_channels, H / f, W / f)
    encode(x, generator=None) -> z    # (B,3,H,W) in [-1,1] -> latent; stochastic where the model is
    decode(z) -> x                    # latent -> (B,3,H,W) float32
    embed(prompts: list[str]) -> e    # (N, L, D) text embeddings
    eps(z, t: int, e) -> Tensor       # noise prediction, no guidance inside; z and e share the batch size
    image_features(x) -> f            # (B, D) image embedding used by TReg's adaptive negation

Solver maths runs in float32; the prior casts to the model dtype on the way in and back to float32 on the way out.
"""
from treg.hub import ModelUnavailable


class PriorUnavailable(ModelUnavailable):
    """A prior could not be loaded; the message is one line saying what is missing and what to do."""
