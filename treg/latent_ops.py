"""The measurement as a linear operator H on the prior's diffusion variable, for the solvers that need H's
pseudo-inverse, projector or SVD there (treg.solvers.fast: CCI, ΠGDM, DDRM).

    pixel prior (vae_scale_factor 1)   H = the pixel operator, with pinv from its SVD in float64 where it has one
                                       (SpectralOperator: then H⁺H is an exact projector), else its own CG pinv
    linear decoder (analytic prior)    H = M = A∘decode, exact (DecodedOperator)
    Stable Diffusion                   A∘decode is nonlinear: no exact H. `surrogate=True` gives the reference's
                                       experimental latent stand-in for SR and inpainting (LatentSurrogate)
"""
import copy
import math

import torch
import torch.nn.functional as F

from treg.config import ConfigError
from treg.linalg import conjugate_gradient
from treg.operators import SVD

DENSE_LIMIT = 1024  # latent dimensions up to which M is formed densely (its SVD costs well under a second)


def linear_map(prior, op):
    """(M, Mᵀ) in float64 for M = A∘decode. Mᵀ uses decode's true adjoint, which is not encode when there is a gain."""
    if isinstance(op, torch.nn.Module):
        op = copy.deepcopy(op).double()
    return (lambda z: op.A(prior.decode(z))), (lambda r: prior.decode_adjoint(op.At(r)))


class DecodedOperator:
    """M = A∘decode on the latents of a prior with a linear decoder, in float64.

    Up to DENSE_LIMIT latent dimensions, M is formed and MᵀM = V S² Vᵀ diagonalised: pinv, the projector M⁺M and
    the SVD are then exact (singular values below `rtol` of the largest count as 0, the operator's own pinv_rtol
    for blur). Larger latents: M⁺ is the minimum-norm solution of MᵀM u = Mᵀb by CG from 0 (its iterates stay in
    range(Mᵀ)), to a relative residual of 1e-10; no SVD.
    """

    def __init__(self, prior, op, shape):
        self.forward, self.adjoint = linear_map(prior, op)
        self.shape = tuple(shape)  # (C, h, w) of one latent
        n = math.prod(self.shape)
        self.rtol = getattr(op, "pinv_rtol", 1e-6)  # eigh of MᵀM resolves s only down to ~1e-8·max
        self.v = None
        if n <= DENSE_LIMIT:
            # M as an (m, n) matrix, through whichever of M and Mᵀ has fewer basis vectors to push (SR: Mᵀ)
            measured = self.forward(torch.zeros(1, *self.shape, dtype=torch.float64)).shape[1:]
            m = math.prod(measured)
            if m < n:
                matrix = self.adjoint(torch.eye(m, dtype=torch.float64).view(m, *measured)).flatten(1)
            else:
                matrix = self.forward(torch.eye(n, dtype=torch.float64).view(n, *self.shape)).flatten(1).T
            lam, v = torch.linalg.eigh(matrix.T @ matrix)  # MᵀM = V S² Vᵀ
            s = lam.clamp(min=0).sqrt()
            self.v, self.s = v, torch.where(s >= self.rtol * s.max(), s, torch.zeros_like(s))

    def A(self, z):
        return self.forward(z.double())

    def At(self, y):
        return self.adjoint(y.double())

    def pinv(self, y):
        b = self.adjoint(y.double())
        if self.v is None:
            tol = 1e-10 * b.flatten(1).norm(dim=1).max().item()
            return conjugate_gradient(lambda u: self.adjoint(self.forward(u)), b, torch.zeros_like(b), 1000, tol)
        inverse = torch.where(self.s > 0, self.s ** -2, torch.zeros_like(self.s))
        return ((b.flatten(1) @ self.v) * inverse @ self.v.T).view(b.shape)

    def svd(self, like):
        """M = U S Vᵀ with u_i = M v_i / s_i; spectral vectors are (B, n)."""
        if self.v is None:
            raise ValueError(f"the latent operator's SVD is formed densely only up to {DENSE_LIMIT} latent "
                             f"dimensions; this image has {math.prod(self.shape)} (use a smaller --image_size)")
        v, s = self.v, self.s
        inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        flat = lambda z: z.double().flatten(1)
        return SVD(Vt=lambda z: flat(z) @ v, V=lambda zb: (zb @ v.T).view(-1, *self.shape),
                   Ut=lambda y: (flat(self.adjoint(y.double())) @ v) * inverse,
                   U=lambda yb: self.forward(((yb * inverse) @ v.T).view(-1, *self.shape)), singulars=s)


class SpectralOperator:
    """A pixel operator in float64 whose pinv is V S⁺ Uᵀ from its own SVD, so that P = H⁺H is exactly idempotent."""

    def __init__(self, op, like):
        self.op, self.spectral = op, op.svd(like.double())
        s = self.spectral.singulars
        self.inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))

    def A(self, x):
        return self.op.A(x.double())

    def At(self, y):
        return self.op.At(y.double())

    def pinv(self, y):
        d = self.spectral
        return d.V(self.inverse * d.Ut(y.double()))

    def svd(self, like):
        return self.spectral


class LatentSurrogate:
    """EXPERIMENTAL stand-in for A∘decode on Stable Diffusion latents (fast-samplers reference §1.6 (a); not in
    any paper): inpainting → the latent mask, an 8×8 min-pool of the pixel mask (a latent is "observed" only if
    its whole patch is); ×s SR → average pooling by s/8 of the latent. H⁺y is replaced by P·encode(A⁺y)."""

    def __init__(self, op, factor):
        if hasattr(op, "mask"):  # duck-typed: solve.py hands solvers a profiling proxy of the operator
            self.mask = -F.max_pool2d(-op.mask, factor)
            self.pool = None
        elif getattr(op, "scale", 0) % factor == 0 and getattr(op, "scale", 0):
            self.mask, self.pool = None, op.scale // factor
        else:
            raise ConfigError("on Stable Diffusion, cci has a latent surrogate only for inpainting and ×8/×16 SR")

    def A(self, z):
        return self.mask.to(z) * z if self.mask is not None else F.avg_pool2d(z, self.pool)

    def pinv(self, y):
        """Mask: itself. Average pooling by p has orthogonal rows of norm 1/p, so its pinv is nearest upsampling."""
        return self.mask.to(y) * y if self.mask is not None else F.interpolate(y, scale_factor=self.pool)


def latent_operator(prior, op, like, surrogate=False):
    """H for `prior` and pixel operator `op` on latents shaped like `like` (B, C, h, w); see the module docstring.
    Returns None for Stable Diffusion unless `surrogate` (then LatentSurrogate, or ValueError for other operators)."""
    shape = like.shape[1:]
    if prior.vae_scale_factor == 1:
        try:
            return SpectralOperator(op, like)
        except ValueError:  # no SVD (motion blur): the operator's own CG pinv
            return op
    if hasattr(prior, "decode_adjoint"):
        return DecodedOperator(prior, op, shape)
    return LatentSurrogate(op, prior.vae_scale_factor) if surrogate else None


def projector(h):
    """P = H⁺H, the orthogonal projector onto H's row space."""
    return lambda x: h.pinv(h.A(x))
