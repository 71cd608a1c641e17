"""The exact posterior of an AnalyticPrior under a linear measurement y = A·decode(z0) + σ·n, n ~ N(0, I).

With M = A∘decode (linear in z) and the prior z0 ~ Σ_k π_k N(μ_k, s²I), the posterior is again a Gaussian mixture
whose components share one covariance:
    Σ   = (I/s² + MᵀM/σ²)⁻¹
    m_k = Σ(μ_k/s² + Mᵀy/σ²) = μ_k + Σ Mᵀ(y − Mμ_k)/σ²
    w_k ∝ π_k N(y; Mμ_k, σ²I + s²MMᵀ)     (the log-determinant is the same for every k and cancels)
Nothing is formed as a matrix (at 512² Σ would have 16384² entries): M and Mᵀ = decodeᵀ∘Aᵀ are applied as functions
and every inverse is a conjugate-gradient solve in float64. Operators that are nn.Modules are copied to float64.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import math

import torch

from treg.latent_ops import linear_map
from treg.linalg import conjugate_gradient
from treg.priors.analytic import AnalyticPrior, load_image

CG_RTOL = 1e-12


def cg(apply, b, iters):
    """Solve apply(x) = b from x = 0, one system per row of b, to a residual of CG_RTOL·max‖b_row‖."""
    tol = CG_RTOL * b.flatten(1).norm(dim=1).max().item()
    return conjugate_gradient(apply, b, torch.zeros_like(b), iters, tol)


@dataclass
class ExactPosterior:
    """p(z0 | y, prompt) = Σ_k w_k N(m_k, Σ); `means` (K,4,h,w) and `log_weights` (K,) are float64."""

    means: torch.Tensor
    log_weights: torch.Tensor
    y: torch.Tensor
    forward: Callable  # M
    adjoint: Callable  # Mᵀ
    std: float  # s
    sigma: float  # σ
    cg_iters: int

    def precision(self, z):
        """Σ⁻¹z = z/s² + MᵀMz/σ²."""
        return z / self.std ** 2 + self.adjoint(self.forward(z)) / self.sigma ** 2

    def cov(self, v):
        """Σv by CG, for each row of v."""
        return cg(self.precision, v.double(), self.cg_iters)

    @property
    def mean(self):
        """E[z0 | y] = Σ_k w_k m_k, (1,4,h,w)."""
        return torch.einsum("k,kchw->chw", self.log_weights.exp(), self.means)[None]


def exact_posterior(prior, op, y, prompt, sigma, cg_iters=500):
    """The exact posterior for measurement y (1, …) of noise σ; `prompt` is a string or an embedding (1, L, D)."""
    forward, adjoint = linear_map(prior, op)
    y = y.double()
    e = prior.embed([prompt]) if isinstance(prompt, str) else prompt
    log_pi = prior.log_weights(e).double()[0]
    mty = adjoint(y)
    mu = prior.means(*mty.shape[-2:]).to(mty)
    s2, n2 = prior.std ** 2, sigma ** 2
    post = ExactPosterior(mu, log_pi, y, forward, adjoint, prior.std, sigma, cg_iters)  # prior's; updated below
    residual = y - forward(mu)  # (K, …)
    post.means = mu + post.cov(adjoint(residual)) / n2
    quad = (residual * cg(lambda r: n2 * r + s2 * forward(adjoint(r)), residual, cg_iters)).flatten(1).sum(1)
    post.log_weights = torch.log_softmax(log_pi - quad / 2, dim=0)
    return post


def _randn(shape, generator, like):
    """Standard normal float64 noise drawn on the generator's device, moved to `like`'s device."""
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float64).to(like.device)


def sample(posterior, n, generator=None):
    """n exact draws (n,4,h,w) float64 by perturbation–optimisation: k ~ w, then
    z = m_k + Σ(n1/s + Mᵀn2/σ) with n1, n2 ~ N(0, I); the perturbation has covariance Σ Σ⁻¹ Σ = Σ."""
    device = generator.device if generator is not None else "cpu"
    k = torch.multinomial(posterior.log_weights.exp().to(device), n, replacement=True, generator=generator)
    n1 = _randn((n, *posterior.means.shape[1:]), generator, posterior.means)
    n2 = _randn((n, *posterior.y.shape[1:]), generator, posterior.means)
    kick = n1 / posterior.std + posterior.adjoint(n2) / posterior.sigma
    return posterior.means[k.to(posterior.means.device)] + posterior.cov(kick)


def ambiguous_prior(op, image_size, base_image, captions, sigma, *, scale=1.0, std=0.1, beta=5.0,
                    generator=None, cg_iters=500):
    """An AnalyticPrior whose K = len(captions) means differ only in the null space of M = A∘decode.

    μ_k = μ0 + δ_k with μ0 = encode(base image) (a path or a (1,3,S,S) tensor at S = image_size) and δ_k the
    projection v_k − M⁺Mv_k of v_k ~ N(0, I) (from `generator`), rescaled to RMS `scale` latent units. M⁺Mv is the
    minimum-norm solution of MᵀM u = MᵀMv, which CG from u = 0 finds because its iterates stay in range(Mᵀ).
    The measurement then cannot tell the components apart and only the prompt can; raises if some δ_k leaks more
    than 1e-3·σ (RMS per measured value) into the measurement, i.e. would be visible under noise σ > 0.
    """
    x = load_image(base_image, image_size) if isinstance(base_image, (str, Path)) else base_image
    if x.shape != (1, 3, image_size, image_size):
        raise ValueError(f"base image has shape {tuple(x.shape)}, expected (1, 3, {image_size}, {image_size})")
    k = len(captions)
    prior = AnalyticPrior(captions, means=torch.zeros(k, 4, 1, 1), std=std, beta=beta)
    mu0 = prior.encode(x.double())
    forward, adjoint = linear_map(prior, op)
    normal = lambda u: adjoint(forward(u))
    v = _randn((k, *mu0.shape[1:]), generator, mu0)
    delta = v - cg(normal, normal(v), cg_iters)
    rms = delta.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)
    if (rms < 1e-6 * v.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)).any():
        raise ValueError("M = A∘decode has (almost) no null space: every latent direction is measured")
    delta = delta * scale / rms
    leak = forward(delta).flatten(1).pow(2).mean(1).sqrt().max().item()
    if not leak <= 1e-3 * sigma:
        raise ValueError(f"null-space projection leaks {leak:.2e} RMS into y, more than 1e-3·σ; raise cg_iters")
    return AnalyticPrior(captions, means=mu0 + delta, std=std, beta=beta)


def landed_component(prior, x, posterior):
    """(k, w_k), each (B,): the component whose posterior mean is nearest to each solution, and its posterior weight.

    x is a solver output image (B,3,H,W), encoded first, or a latent (B,4,h,w).
    """
    z = x if x.shape[1] == prior.latent_channels else prior.encode(x)
    k = torch.cdist(z.flatten(1).double(), posterior.means.flatten(1).to(z.device)).argmin(1)
    return k, posterior.log_weights.exp().to(z.device)[k]


def latent_gram(prior, op, shape):
    """(MᵀM as a dense (n, n) float64 matrix, M, Mᵀ) for M = A∘decode on latents of `shape` (n = 4hw ≤ 1024)."""
    forward, adjoint = linear_map(prior, op)
    n = math.prod(shape)
    gram = adjoint(forward(torch.eye(n, dtype=torch.float64).view(n, *shape))).flatten(1)
    return (gram + gram.T) / 2, forward, adjoint


def dense_posterior(prior, op, gram, y, prompt, sigma):
    """treg.priors.posterior.exact_posterior computed with the dense MᵀM instead of CG (its formulas; equal to it, see
    tests): Σ = (I/s² + MᵀM/σ²)⁻¹, m_k = Σ(μ_k/s² + Mᵀy/σ²), and by Woodbury
    (σ²I + s²MMᵀ)⁻¹ = (I − M(σ²/s²·I + MᵀM)⁻¹Mᵀ)/σ² for the weights. CG on blur needs hundreds of iterations."""
    forward, adjoint = linear_map(prior, op)
    y = y.double()
    mu = prior.means(*adjoint(y).shape[-2:]).double()
    s2, n2 = prior.std ** 2, sigma ** 2
    eye = torch.eye(len(gram), dtype=gram.dtype)
    sigma_post = torch.linalg.inv(eye / s2 + gram / n2)
    means = (mu.flatten(1) / s2 + adjoint(y).flatten(1) / n2) @ sigma_post  # Σ is symmetric
    residual = y - forward(mu)
    u = adjoint(residual).flatten(1)
    quad = (residual.flatten(1).pow(2).sum(1) - (u * torch.linalg.solve(n2 / s2 * eye + gram, u.T).T).sum(1)) / n2
    e = prior.embed([prompt]) if isinstance(prompt, str) else prompt
    log_weights = torch.log_softmax(prior.log_weights(e).double()[0] - quad / 2, dim=0)
    # cov and sample run CG on the n×n precision: n iterations reach the exact solution
    return ExactPosterior(means.view_as(mu), log_weights, y, forward, adjoint, prior.std, sigma, len(gram))
