"""The exact posterior (treg.priors.posterior) against its closed form computed densely here: M = A∘decode as a matrix,
Σ = (I/s² + MᵀM/σ²)⁻¹ by a dense inverse, the component weights from torch's multivariate normal densities, and
the null-space means of ambiguous_prior from a dense pseudo-inverse. 2×2 latents (n = 16), seconds in all."""
import pytest
import torch
from torch.distributions import MultivariateNormal

from treg.latent_ops import linear_map
from treg.operators import build_operator
from treg.priors.analytic import AnalyticPrior
from treg.priors.posterior import CG_RTOL, ambiguous_prior, cg, exact_posterior, landed_component, sample

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


def test_cg_meets_its_residual_bound_for_rows_of_any_scale():
    """cg on a 2-D batch (9 rows of norm 1e-3) of a diagonal SPD system with eigenvalues spread over [1, 100]:
    every row's true residual ‖b − d·x‖ is within CG_RTOL·max‖b_row‖ (the stated bound, relative to the largest
    row, not to the whole batch's norm nor absolute) and x matches the dense solution b/d."""
    d = torch.logspace(0, 2, 200, dtype=torch.float64)
    b = torch.randn(9, 200, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    b = 1e-3 * b / b.norm(dim=1, keepdim=True)
    x = cg(lambda u: u * d, b, 500)
    assert ((b - x * d).norm(dim=1) <= CG_RTOL * 1e-3).all()
    torch.testing.assert_close(x, b / d, rtol=0, atol=CG_RTOL * 1e-3)  # ‖x − b/d‖ ≤ ‖r‖/λ_min, λ_min = 1


def test_exact_posterior_takes_float32_means_to_float64():
    """A prior whose means are float32 (as a user may give them): the posterior means still equal the dense
    closed form Σ(μ_k/s² + Mᵀy/σ²) of those means in float64 to 1e-9: they are promoted before M is applied."""
    prior64, op, m, y = setting("sr8", 0.05)
    mu32 = prior64.means(2, 2).float()
    prior = AnalyticPrior(CAPTIONS, means=mu32, std=prior64.std, beta=prior64.beta)
    post = exact_posterior(prior, op, y.view(1, 3, 2, 2), "red apple", 0.05)
    s2, n2 = prior.std ** 2, 0.05 ** 2
    cov = torch.linalg.inv(torch.eye(16, dtype=torch.float64) / s2 + m.T @ m / n2)
    means = (mu32.double().flatten(1) / s2 + y @ m / n2) @ cov
    assert post.means.dtype == torch.float64
    torch.testing.assert_close(post.means.flatten(1), means, rtol=1e-9, atol=1e-10)


def test_a_draw_is_the_perturbation_formula_replayed_densely():
    """sample against a per-step replay of its formula with the same random stream and dense matrices:
    k ~ multinomial(w), n1 ~ N(0, I) (latent shape), n2 ~ N(0, I) (measurement shape), z = m_k + Σ(n1/s + Mᵀn2/σ)
    with Σ a dense inverse. Checked for a seeded generator and for generator=None, which draws from torch's
    global generator (seeded here inside fork_rng, so a Generator seeded alike gives the same stream)."""
    prior, op, m, y = setting("sr8", 0.05)
    post = exact_posterior(prior, op, y.view(1, 3, 2, 2), "red apple", 0.05)
    cov = torch.linalg.inv(torch.eye(16, dtype=torch.float64) / prior.std ** 2 + m.T @ m / 0.05 ** 2)
    n = 40

    def replay(seed):
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(post.log_weights.exp(), n, replacement=True, generator=g)
        n1 = torch.randn(n, 16, generator=g, dtype=torch.float64)
        n2 = torch.randn(n, 12, generator=g, dtype=torch.float64)
        return post.means.flatten(1)[k] + (n1 / prior.std + n2 @ m / 0.05) @ cov, k

    z, k = replay(10)
    assert len(set(k.tolist())) >= 2  # draws from several components
    torch.testing.assert_close(sample(post, n, torch.Generator().manual_seed(10)).flatten(1), z, rtol=1e-9,
                               atol=1e-10)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        drawn = sample(post, n)
    torch.testing.assert_close(drawn.flatten(1), replay(11)[0], rtol=1e-9, atol=1e-10)


def test_ambiguous_prior_defaults_are_the_signatures():
    """With only the required arguments: δ_k has RMS scale = 1 (against the dense pseudo-inverse projection of the
    same draw), and the prior has std 0.1 and β = 5, the defaults the signature states."""
    op = build_operator(*OPS["sr8"][:1], SIZE, **OPS["sr8"][1])
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    prior = ambiguous_prior(op, SIZE, x, CAPTIONS, 0.05, generator=torch.Generator().manual_seed(5))
    base = AnalyticPrior(CAPTIONS, means=torch.zeros(3, 4, 1, 1))
    m = dense(lambda z: build_operator(*OPS["sr8"][:1], SIZE, **OPS["sr8"][1]).double().A(base.decode(z)))
    v = torch.randn(3, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    delta = v - v @ (torch.linalg.pinv(m) @ m).T
    delta = delta / delta.pow(2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(prior.means(2, 2).flatten(1), base.encode(x.double()).flatten(1) + delta, rtol=1e-7,
                               atol=1e-8)
    assert prior.std == 0.1 and prior.beta == 5.0


class MatrixOp:
    """An operator given by its matrix P on flattened (B,3,16,16) images: A(x) = P·vec(x), Aᵀ(r) = Pᵀr."""

    def __init__(self, p):
        self.p = p

    def A(self, x):
        return x.flatten(1) @ self.p.T

    def At(self, r):
        return (r @ self.p).view(-1, 3, SIZE, SIZE)


def test_ambiguous_prior_refuses_an_operator_without_null_space():
    """Blur at 16² measures all 16 latent directions (M = A∘decode has full column rank), so no δ_k survives the
    projection (RMS ~1e-12 of the draw): the user is told so rather than given means of amplified round-off."""
    op = build_operator(*OPS["blur"][:1], SIZE, **OPS["blur"][1])
    base = AnalyticPrior(CAPTIONS, means=torch.zeros(3, 4, 1, 1))
    assert torch.linalg.matrix_rank(dense(lambda z: op.double().A(base.decode(z)))) == 16
    op = build_operator(*OPS["blur"][:1], SIZE, **OPS["blur"][1])
    message = "^M = A∘decode has \\(almost\\) no null space: every latent direction is measured$"
    with pytest.raises(ValueError, match=message):
        ambiguous_prior(op, SIZE, torch.zeros(1, 3, SIZE, SIZE), CAPTIONS, 0.05,
                        generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("f", [0.7, 1.3])
def test_the_no_null_space_threshold_is_per_draw_relative(f):
    """M = I − uuᵀ on the latents (an operator A = (I − uuᵀ)·D⁺ on images, D the dense decoder, so A∘decode = M
    exactly): δ_k = (v_k·u)u. u is chosen so that the draw v_0 (seed 1, RMS 0.67, the smallest of the three; the
    batch RMS is 1.19 and the largest row 1.51) has RMS(δ_0) = f·1e-6·RMS(v_0). The bound is relative to each draw's
    own RMS: f = 0.7 refuses, f = 1.3 is accepted with δ_k = scale·sign(v_k·u)·u/RMS(u) (closed form). A
    threshold absolute (1e-6/RMS(v_0)), or against another row's or the batch's RMS would refuse f = 1.3."""
    base = AnalyticPrior(CAPTIONS, means=torch.zeros(3, 4, 1, 1))
    d = dense(base.decode, LATENT)  # (768, 16), DᵀD = 64·I
    v = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # the same draw
    q = v.pow(2).mean(1).sqrt()
    assert q.argmin() == 0 and 1.3 * q[0] < min(1 / q[0], q.max(), v.pow(2).mean().sqrt())
    v0 = v[0] / v[0].norm()
    w = v[1] - (v[1] @ v0) * v0
    u = w / w.norm() + f * 1e-6 * v0  # RMS(δ_0)/RMS(v_0) = |v̂_0·u|/|u| = f·1e-6 to 1e-12
    u = u / u.norm()
    op = MatrixOp((torch.eye(16, dtype=torch.float64) - torch.outer(u, u)) @ torch.linalg.pinv(d))
    x = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float64)
    run = lambda: ambiguous_prior(op, SIZE, x, CAPTIONS, 0.05, scale=0.5, generator=torch.Generator().manual_seed(1))
    if f < 1:
        with pytest.raises(ValueError, match="no null space"):
            run()
        return
    delta = 0.5 * torch.sign(v @ u)[:, None] * u / u.pow(2).mean().sqrt()
    torch.testing.assert_close(run().means(2, 2).flatten(1), delta, rtol=0, atol=1e-8)


def test_the_leak_bound_is_the_largest_rows_rms_against_1e3_sigma():
    """With cg_iters=1 the projection leaks. The leak L = max_k RMS(M δ_k) is measured here with the dense M on the
    returned δ_k (σ large enough to accept); the rows' leaks differ (batch RMS < 0.99·L, and the largest per-pixel
    channel RMS > 1.01·L). The same draw is then accepted at σ = 1.01·L/1e-3 (same means) and refused at
    σ = 0.99·L/1e-3."""
    make = lambda: build_operator(*OPS["sr8"][:1], SIZE, **OPS["sr8"][1])
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    run = lambda sigma: ambiguous_prior(make(), SIZE, x, CAPTIONS, sigma, cg_iters=1,
                                        generator=torch.Generator().manual_seed(5))
    base = AnalyticPrior(CAPTIONS, means=torch.zeros(3, 4, 1, 1))
    m = dense(lambda z: make().double().A(base.decode(z)))
    loose = run(1e9).means(2, 2)
    seen = (loose - base.encode(x.double())).flatten(1) @ m.T  # (3, 12) = (3, 3 colours, 2×2)
    leak = seen.pow(2).mean(1).sqrt()
    big = leak.max().item()
    assert seen.pow(2).mean().sqrt() < 0.99 * big and seen.view(3, 3, 4).pow(2).mean(1).sqrt().max() > 1.01 * big
    torch.testing.assert_close(run(1.01 * big / 1e-3).means(2, 2), loose, rtol=0, atol=0)
    with pytest.raises(ValueError, match="leaks"):
        run(0.99 * big / 1e-3)
