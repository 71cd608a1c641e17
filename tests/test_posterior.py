"""The exact posterior (treg.priors.posterior) against its closed form computed densely here: M = A∘decode as a matrix,
Σ = (I/s² + MᵀM/σ²)⁻¹ by a dense inverse, the component weights from torch's multivariate normal densities, and
the null-space means of ambiguous_prior from a dense pseudo-inverse. 2×2 latents (n = 16), seconds in all."""
import pytest
import torch
from torch.distributions import MultivariateNormal

from treg.latent_ops import linear_map
from treg.operators import build_operator
from treg.priors.analytic import AnalyticPrior
from treg.priors.posterior import ambiguous_prior, exact_posterior, landed_component, sample

SIZE, LATENT = 16, (4, 2, 2)
CAPTIONS = ["red apple", "blue car", "green tree"]
pytestmark = pytest.mark.usefixtures("one_thread")


def dense(apply, shape=LATENT):
    n = torch.Size(shape).numel()
    return apply(torch.eye(n, dtype=torch.float64).view(n, *shape)).flatten(1).T


def toy(std=0.1, scale=0.3, beta=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(3, *LATENT, generator=g, dtype=torch.float64)
    return AnalyticPrior(CAPTIONS, means=means, std=std, beta=beta)


OPS = {"sr8": ("super_resolution", {"scale": 8}),  # 12 measurements of 16 latents: a null space
       "blur": ("blur", {"kernel": "gaussian", "kernel_size": 5, "std": 1.5})}


def setting(name, sigma, seed=1):
    """prior, operator (float32, as solve.py builds it), dense M, and a y between components 0 and 1."""
    prior, op = toy(), build_operator(OPS[name][0], SIZE, **OPS[name][1])
    m = dense(lambda z: op.double().A(prior.decode(z)))
    op = build_operator(OPS[name][0], SIZE, **OPS[name][1])  # .double() above changed that copy in place
    mu = prior.means(2, 2).flatten(1)
    g = torch.Generator().manual_seed(seed)
    y = (mu[:2].mean(0) @ m.T + sigma * torch.randn(m.shape[0], generator=g, dtype=torch.float64))
    return prior, op, m, y


@pytest.mark.parametrize("name,sigma", [("sr8", 0.05), ("blur", 0.2)])
def test_exact_posterior_is_the_dense_closed_form(name, sigma):
    prior, op, m, y = setting(name, sigma)
    measured_shape = op.A(torch.zeros(1, 3, SIZE, SIZE)).shape
    post = exact_posterior(prior, op, y.view(measured_shape).float(), "red apple", sigma)
    s2, n2, n = prior.std ** 2, sigma ** 2, m.shape[1]
    y = y.float().double()  # what the posterior was given
    precision = torch.eye(n, dtype=torch.float64) / s2 + m.T @ m / n2
    cov = torch.linalg.inv(precision)
    mu = prior.means(2, 2).flatten(1)
    means = (mu / s2 + y @ m / n2) @ cov  # Σ(μ_k/s² + Mᵀy/σ²), Σ symmetric
    log_pi = prior.log_weights(prior.embed(["red apple"]))[0].double()
    marginal = s2 * m @ m.T + n2 * torch.eye(m.shape[0], dtype=torch.float64)
    log_w = torch.log_softmax(log_pi + torch.stack([MultivariateNormal(m @ mk, marginal).log_prob(y) for mk in mu]),
                              0)
    assert (log_w.exp() > 0.005).sum() >= 2 and (log_w - log_pi).abs().max() > 0.1  # y moves non-trivial weights
    torch.testing.assert_close(post.log_weights, log_w, rtol=0, atol=1e-8)
    torch.testing.assert_close(post.means.flatten(1), means, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(post.mean.flatten(), log_w.exp() @ means, rtol=1e-9, atol=1e-10)
    v = torch.randn(5, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(post.cov(v.view(5, *LATENT).float()).flatten(1), v.float().double() @ cov,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(post.precision(v.view(5, *LATENT)).flatten(1), v @ precision, rtol=1e-10, atol=1e-9)
    assert post.std == prior.std and post.sigma == sigma and post.y.dtype == torch.float64


def test_an_embedding_is_taken_as_the_prompt():
    prior, op, _, y = setting("blur", 0.2)
    y = y.view(1, 3, SIZE, SIZE)
    by_text = exact_posterior(prior, op, y, "blue car", 0.2)
    by_embedding = exact_posterior(prior, op, y, prior.embed(["blue car"]), 0.2)
    torch.testing.assert_close(by_embedding.log_weights, by_text.log_weights)
    assert (by_text.log_weights - exact_posterior(prior, op, y, "red apple", 0.2).log_weights).abs().max() > 0.1


def test_exact_draws_have_the_mixtures_mean_and_covariance():
    """2000 draws in 16 dimensions: each mean coordinate within 4.5 standard errors (false-failure rate < 1e-4
    over the 16) and each covariance entry within 0.15 of the largest, ≥ 4.7 of its standard errors (for a
    Gaussian ≤ √(2/2000) of the largest)."""
    prior, op, m, y = setting("sr8", 0.05)
    post = exact_posterior(prior, op, y.view(1, 3, 2, 2), "red apple", 0.05)
    w = post.log_weights.exp()
    means = post.means.flatten(1)
    shared = torch.linalg.inv(torch.eye(16, dtype=torch.float64) / prior.std ** 2 + m.T @ m / 0.05 ** 2)
    mean = w @ means
    cov = shared + (w[:, None, None] * means[:, :, None] * means[:, None, :]).sum(0) - torch.outer(mean, mean)
    n = 2000
    draws = sample(post, n, torch.Generator().manual_seed(3))
    assert draws.shape == (n, *LATENT) and draws.dtype == torch.float64
    draws = draws.flatten(1)
    assert ((draws.mean(0) - mean).abs() <= 4.5 * (cov.diagonal() / n).sqrt()).all()
    assert (draws.T.cov() - cov).abs().max() <= 0.15 * cov.abs().max()
    assert (draws.T.cov() - cov).abs().max() < 0.5 * (cov - shared).abs().max()  # the mixture part is seen
    again = sample(post, 3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, sample(post, 3, torch.Generator().manual_seed(3)))  # the generator decides


def test_ambiguous_prior_means_differ_only_in_the_dense_null_space():
    op = build_operator(*OPS["sr8"][:1], SIZE, **OPS["sr8"][1])
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    sigma, scale = 0.05, 0.7
    prior = ambiguous_prior(op, SIZE, x, CAPTIONS, sigma, scale=scale, std=0.05, beta=4.0,
                            generator=torch.Generator().manual_seed(5))
    base = AnalyticPrior(CAPTIONS, means=torch.zeros(3, 4, 1, 1))
    m = dense(lambda z: build_operator(*OPS["sr8"][:1], SIZE, **OPS["sr8"][1]).double().A(base.decode(z)))
    v = torch.randn(3, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # the same draw
    delta = v - v @ (torch.linalg.pinv(m) @ m).T
    delta = delta * scale / delta.pow(2).mean(1, keepdim=True).sqrt()
    mu = prior.means(2, 2)
    torch.testing.assert_close(mu.flatten(1), base.encode(x.double()).flatten(1) + delta, rtol=1e-7, atol=1e-8)
    assert prior.std == 0.05 and prior.beta == 4.0 and prior.captions == CAPTIONS
    seen = mu.flatten(1) @ m.T
    assert (seen - seen[0]).abs().max() < 1e-9 and (mu - mu[0]).abs().max() > 0.5


def test_ambiguous_prior_refuses_a_wrong_image_shape_and_a_leaky_projection():
    op = build_operator(*OPS["sr8"][:1], SIZE, **OPS["sr8"][1])
    with pytest.raises(ValueError, match=r"base image has shape \(1, 3, 8, 8\), expected \(1, 3, 16, 16\)"):
        ambiguous_prior(op, SIZE, torch.zeros(1, 3, 8, 8), CAPTIONS, 0.05)
    x = torch.zeros(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="leaks .* RMS into y, more than 1e-3·σ; raise cg_iters"):
        ambiguous_prior(op, SIZE, x, CAPTIONS, 0.05, cg_iters=1, generator=torch.Generator().manual_seed(5))
    ambiguous_prior(op, SIZE, x, CAPTIONS, 0.05, cg_iters=12, generator=torch.Generator().manual_seed(5))  # M⁺M: ≤ 12


def test_landed_component_is_the_nearest_posterior_mean_for_latents_and_images():
    prior, op, _, y = setting("blur", 0.2)
    post = exact_posterior(prior, op, y.view(1, 3, SIZE, SIZE), "red apple", 0.2)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(8, *LATENT, generator=g, dtype=torch.float64) * 0.3
    distances = torch.stack([(z - mk).flatten(1).norm(dim=1) for mk in post.means], 1)
    nearest = distances.argmin(1)
    assert len(set(nearest.tolist())) > 1  # several components are hit
    for x in (z, prior.decode(z).float()):
        k, w = landed_component(prior, x, post)
        assert k.tolist() == nearest.tolist()
        torch.testing.assert_close(w, post.log_weights.exp()[nearest])


def test_linear_map_leaves_the_callers_operator_in_float32():
    prior, op = toy(), build_operator("blur", SIZE, kernel="gaussian", kernel_size=5, std=1.5)
    forward, adjoint = linear_map(prior, op)
    z = torch.randn(2, *LATENT, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    r = forward(z)
    assert r.dtype == torch.float64 and op.kernel.dtype == torch.float64  # Blur keeps its kernel in float64
    assert all(b.dtype != torch.float64 for b in build_operator("super_resolution", SIZE, scale=8).buffers())
    sr = build_operator("super_resolution", SIZE, scale=8)
    forward, adjoint = linear_map(prior, sr)
    assert sr.matrix.dtype == torch.float32 and forward(z).dtype == torch.float64  # a float64 copy, not in place
    y = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    lhs, rhs = (forward(z) * y).sum(), (z * adjoint(y)).sum()
    assert torch.isclose(lhs, rhs, rtol=1e-12)  # Mᵀ is M's exact adjoint (decode's adjoint, not encode)
