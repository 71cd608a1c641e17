"""The analytic prior and its exact posterior, checked against autograd and Monte Carlo. Offline, CPU, seconds."""

import pytest
import torch
import torch.nn.functional as F

from treg.config import SAMPLES
from treg.latent_ops import linear_map
from treg.operators import build_operator
from treg.priors.analytic import AnalyticPrior, load_image
from treg.priors.posterior import ambiguous_prior, exact_posterior, landed_component, sample

NULL_PROMPT = "out of focus, depth of field"


class Mask:
    """Inpainting: y = m ⊙ x (self-adjoint)."""

    def __init__(self, mask):
        self.mask = mask

    def A(self, x):
        return self.mask.to(x) * x

    At = A


class AvgPool:
    """f×f average pooling, with its exact adjoint (nearest upsampling divided by f²)."""

    def __init__(self, f):
        self.f = f

    def A(self, x):
        return F.avg_pool2d(x, self.f)

    def At(self, y):
        return y.repeat_interleave(self.f, -2).repeat_interleave(self.f, -1) / self.f ** 2


def box_mask(size, lo, hi):
    mask = torch.ones(1, 1, size, size)
    mask[..., lo:hi, lo:hi] = 0
    return mask


def toy_prior(k=3, size=1, scale=0.4, std=0.3, beta=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(k, 4, size, size, generator=g, dtype=torch.float64)
    return AnalyticPrior(["red apple", "blue car", "green tree", "old boat"][:k], means=means, std=std, beta=beta)


def test_vae_is_an_orthonormal_linear_map_with_gain():
    prior = toy_prior()
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 2, 4, 3, 5, generator=g, dtype=torch.float64)
    x = prior.decode(z1)
    assert x.shape == (2, 3, 24, 40)
    torch.testing.assert_close(prior.encode(x), z1, rtol=0, atol=1e-12)
    u = prior.basis.reshape(192, 4)
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=u.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.norm(), 8 * z1.norm())  # decode = gain · orthonormal
    torch.testing.assert_close(prior.decode(2 * z1 - 3 * z2), 2 * x - 3 * prior.decode(z2))
    # channels 0-2 carry exactly the 8x8 mean colour
    img = torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
    colour = prior.decode(prior.encode(img) * torch.tensor([1.0, 1, 1, 0]).view(1, 4, 1, 1))
    torch.testing.assert_close(colour, AvgPool(8).At(AvgPool(8).A(img)) * 64)


@pytest.mark.parametrize("op", [Mask(box_mask(16, 3, 11)), AvgPool(4)])
def test_measurement_adjoint_is_exact(op):
    forward, adjoint = linear_map(toy_prior(), op)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)
    r = torch.randn(forward(z).shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close((forward(z) * r).sum(), (z * adjoint(r)).sum(), rtol=1e-12, atol=0)


def test_eps_is_the_scaled_score_of_the_noised_mixture():
    prior = toy_prior(size=2)
    e = prior.embed(["red apple", "green tree"]).double().requires_grad_()
    g = torch.Generator().manual_seed(3)
    for t in (0, 50, 300, 700, 999):
        a = prior.alphas_cumprod[t].item()
        z0 = prior.means(2, 2)[[0, 2]] + 0.2 * torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)
        z = (a ** 0.5 * z0 + (1 - a) ** 0.5 * torch.randn(z0.shape, generator=g, dtype=z0.dtype)).requires_grad_()
        (score,) = torch.autograd.grad(prior.log_prob_t(z, t, e).sum(), z)
        eps = prior.eps(z, t, e)
        torch.testing.assert_close(eps, -((1 - a) ** 0.5) * score, rtol=1e-9, atol=1e-9)
    (grad_e,) = torch.autograd.grad(eps.square().sum(), e)  # the prompt must steer ε
    assert grad_e.abs().max() > 0
    assert prior.eps(z.detach().float(), 10, e.detach().float()).dtype == torch.float32


def test_caption_prompts_pick_their_component_and_null_prompts_do_not():
    prior = AnalyticPrior.from_folder()
    captions = list(dict.fromkeys(prior.captions))
    assert len(captions) == 4 and len(prior.captions) == 16  # one component per (low-resolution image, detail)
    assert prior.pairs == [(i, k) for i in range(4) for k in range(4)]
    assert prior.captions == [captions[k] for _, k in prior.pairs]
    e = prior.embed(captions + ["", NULL_PROMPT])
    assert e.shape == (6, 77, 768)
    torch.testing.assert_close(prior.embed(captions), e[:4])  # deterministic
    pi = prior.log_weights(e).exp()
    per_caption = pi.view(6, 4, 4).sum(1)  # summed over the low-resolution groups, which text does not choose
    torch.testing.assert_close(pi.view(6, 4, 4), per_caption[:, None].expand(6, 4, 4) / 4)  # uniform over groups
    assert (per_caption[:4].diagonal() >= 0.9).all()
    torch.testing.assert_close(pi[4], torch.full((16,), 1 / 16, dtype=torch.float64))
    assert (per_caption[5] - 0.25).abs().max() < 0.1


def test_image_features_point_to_the_images_own_caption():
    prior = AnalyticPrior.from_folder()
    names = ("cat_1.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")
    x = torch.cat([load_image(SAMPLES / name, 32) for name in names])
    x = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    f = prior.image_features(x)
    assert f.shape == (4, 768)
    cos = F.normalize(f, dim=-1) @ prior.caption_embeddings.T
    assert [prior.captions[k] for k in cos.argmax(1)] == prior.captions[:4]


def sr16(size):
    return build_operator("super_resolution", size, scale=16)


def test_default_components_share_the_sr16_measurement_and_differ_in_detail():
    prior = AnalyticPrior.from_folder()
    mu = prior.means(8, 8).double()  # 64 px: SR×16 measures 4×4 pixels
    assert mu.shape == (16, 4, 8, 8) and prior.shared_scales[(8, 8)] == 16
    op = sr16(64).double()
    x = torch.cat([load_image(p, 64) for p in prior.image_paths]).double()
    seen = op.A(prior.decode(mu)).view(4, 4, 3, 4, 4)  # (group i, detail k, ...)
    # every component of group i is measured exactly as image i ...
    torch.testing.assert_close(seen, op.A(x)[:, None].expand_as(seen), rtol=0, atol=1e-6 * op.A(x).abs().max().item())
    # ... the groups are told apart by the measurement, and within a group the details differ by many s
    assert (torch.cdist(seen[:, 0].flatten(1), seen[:, 0].flatten(1)) + 1e9 * torch.eye(4)).min() > 1
    for i in range(4):
        group = mu[4 * i:4 * i + 4].flatten(1)
        assert (torch.cdist(group, group) + 1e9 * torch.eye(4)).min() > 10 * prior.std
    # component (k, k) is image k up to what the decoder cannot represent: much nearer than the other details
    enc = prior.encode(x)
    near = torch.stack([(mu[5 * k] - enc[k]).norm() for k in range(4)])
    far = torch.stack([(mu[4 * k + j] - enc[k]).norm() for k in range(4) for j in range(4) if j != k])
    assert near.max() < 0.25 * far.min()


def test_sr16_measurement_leaves_the_choice_of_detail_to_the_text():
    prior = AnalyticPrior.from_folder()
    op, sigma = sr16(64), 0.01
    g = torch.Generator().manual_seed(10)
    y = op.A(load_image(SAMPLES / "cat_1.jpg", 64)).double()
    y = y + sigma * torch.randn(y.shape, generator=g, dtype=y.dtype)
    for prompt in ["a cup of coffee", "a photo of a cat", NULL_PROMPT]:
        post = exact_posterior(prior, op, y, prompt, sigma)
        w = post.log_weights.exp().view(4, 4)
        assert w[0].sum() > 0.999  # the measurement picks the cat's low-resolution group ...
        pi = prior.log_weights(prior.embed([prompt]))[0].double().exp().view(4, 4)[0]
        torch.testing.assert_close(w[0], pi / pi.sum(), rtol=0, atol=1e-3)  # ... and the text the detail
    k, _ = landed_component(prior, sample(post, 1, g), post)
    assert prior.pairs[k.item()][0] == 0


def test_shared_scale_falls_back_where_x16_does_not_fit():
    prior = AnalyticPrior.from_folder()
    assert prior.means(4, 4).shape == (16, 4, 4, 4) and prior.shared_scales[(4, 4)] == 16  # 32 px: 2×2 pixels
    mu = prior.means(5, 5).double()  # 40 px: ×16 does not divide it, ×8 does
    assert prior.shared_scales[(5, 5)] == 8
    op = build_operator("super_resolution", 40, scale=8).double()
    seen = op.A(prior.decode(mu)).view(4, 4, -1)
    assert (seen - seen[:, :1]).abs().max() < 1e-6
    mu = prior.means(4, 6)  # not square: plain image means, one per detail in every group
    assert prior.shared_scales[(4, 6)] is None
    x = torch.cat([load_image(p, 32, 48) for p in prior.image_paths])
    torch.testing.assert_close(mu, prior.encode(x).repeat(4, 1, 1, 1))
    assert prior.means(5, 5) is prior.means(5, 5)  # cached per size
    plain = AnalyticPrior(prior.captions[:4], image_paths=prior.image_paths)  # without shared_scale: the images
    images = torch.cat([load_image(p, 32) for p in prior.image_paths])
    torch.testing.assert_close(plain.means(4, 4), prior.encode(images))


def _dense(forward, n=4):
    """M as a (measurements, n) matrix, for a 1×1 latent."""
    return forward(torch.eye(n, dtype=torch.float64).view(n, n, 1, 1)).flatten(1).T


RANDOM_MASK = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5)) < 0.3).double()


@pytest.mark.parametrize("op, sigma", [(AvgPool(8), 0.3), (Mask(RANDOM_MASK), 1.0)])
def test_exact_posterior_matches_importance_sampling(op, sigma):
    # an 8×8 image, a 1×1 latent, and a y between components 1 and 2 so that all three weights are non-trivial
    prior, prompt = toy_prior(scale=0.2), "red apple"
    forward, _ = linear_map(prior, op)
    g = torch.Generator().manual_seed(6)
    z_mid = prior.means(1, 1)[1:3].mean(0, keepdim=True)
    y = forward(z_mid) + sigma * torch.randn(forward(z_mid).shape, generator=g, dtype=torch.float64)
    post = exact_posterior(prior, op, y, prompt, sigma)

    # self-normalised importance sampling with the prior as proposal
    n, mu, pi = 400_000, prior.means(1, 1).flatten(1), prior.log_weights(prior.embed([prompt]))[0].exp().double()
    k = torch.multinomial(pi, n, replacement=True, generator=g)
    z = mu[k] + prior.std * torch.randn(n, 4, generator=g, dtype=torch.float64)
    log_lik = -((y.flatten(1) - z @ _dense(forward).T) ** 2).sum(1) / (2 * sigma ** 2)
    w = torch.softmax(log_lik, 0)
    assert 1 / (w ** 2).sum() > 20_000  # the proposal is good enough for the tolerances below
    w_k = torch.zeros(3, dtype=torch.float64).index_add_(0, k, w)
    m_k = torch.zeros(3, 4, dtype=torch.float64).index_add_(0, k, w[:, None] * z) / w_k[:, None]

    assert (w_k - pi).abs().max() > 0.1  # the measurement moved the weights, so they are really tested
    torch.testing.assert_close(post.log_weights.exp(), w_k, rtol=0, atol=0.01)
    torch.testing.assert_close(post.means.flatten(1), m_k, rtol=0, atol=0.015)

    draws = sample(post, 20_000, torch.Generator().manual_seed(7)).flatten(1)
    shared = post.cov(torch.eye(4, dtype=torch.float64).view(4, 4, 1, 1)).flatten(1)
    m, wts = post.means.flatten(1), post.log_weights.exp()
    mean = wts @ m
    cov = shared + (wts[:, None, None] * m[:, :, None] * m[:, None, :]).sum(0) - mean[:, None] * mean[None]
    torch.testing.assert_close(draws.mean(0), mean, rtol=0, atol=4 * (cov.diagonal().max() / 20_000) ** 0.5)
    torch.testing.assert_close(draws.T.cov(), cov, rtol=0, atol=0.05 * cov.abs().max().item())
    torch.testing.assert_close(post.mean.flatten(), mean)


@pytest.mark.parametrize("op", [Mask(box_mask(32, 8, 24)), AvgPool(16)])
def test_ambiguous_prior_is_decided_by_the_prompt_alone(op):
    captions = ["a photo of a cat", "a rocket launch", "a cup of coffee on a wooden table"]
    sigma = 0.05
    prior = ambiguous_prior(op, 32, SAMPLES / "cat_1.jpg", captions, sigma, generator=torch.Generator().manual_seed(8))
    forward, _ = linear_map(prior, op)
    mu = prior.means(4, 4)
    seen = forward(mu)
    assert ((seen - seen[:1]).flatten(1).norm(dim=1) <= 1e-4 * seen[0].norm()).all()
    apart = torch.cdist(mu.flatten(1), mu.flatten(1)) + torch.eye(3, dtype=mu.dtype) * 1e9
    assert apart.min() > 50 * prior.std

    g = torch.Generator().manual_seed(9)
    z_true = mu[1:2] + prior.std * torch.randn(1, 4, 4, 4, generator=g, dtype=mu.dtype)
    y = forward(z_true) + sigma * torch.randn(seen[:1].shape, generator=g, dtype=mu.dtype)
    for i, prompt in enumerate(captions + [NULL_PROMPT]):
        post = exact_posterior(prior, op, y, prompt, sigma)
        pi = prior.log_weights(prior.embed([prompt]))[0].double()
        torch.testing.assert_close(post.log_weights.exp(), pi.exp(), rtol=0, atol=1e-5)
        if i < 3:
            k, w = landed_component(prior, sample(post, 1, g), post)
            assert k.item() == i and w.item() > 0.9
            k, _ = landed_component(prior, prior.decode(post.means[i:i + 1]).float(), post)  # images work too
            assert k.item() == i


def test_ambiguous_prior_refuses_an_operator_without_null_space():
    with pytest.raises(ValueError, match="null space"):
        ambiguous_prior(Mask(torch.ones(1, 1, 16, 16)), 16, SAMPLES / "cat_1.jpg", ["one", "two"], 0.05)
