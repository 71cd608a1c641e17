"""Batched conjugate gradient and the L2 proximal step of TReg's data consistency.

Vectors are batched image-shaped tensors (B, ...). Every inner product is taken per sample over dims 1.., so each
sample runs its own CG and the result never depends on what else is in the batch.
"""
import torch


def _dot(a, b):
    """⟨a_b, b_b⟩ for each sample b, shaped (B, 1, …, 1) to broadcast against a."""
    return (a * b).flatten(1).sum(1).view(-1, *[1] * (a.dim() - 1))


def conjugate_gradient(apply, b, x0, iters, tol=0.0):
    """Solve M x = b for a symmetric PSD linear map M = `apply` by at most `iters` CG steps from x0.

    A sample stops, and keeps its x, once its residual ‖b − M x‖ is below `tol` (a float, or one per sample (B,));
    the loop ends when every sample has stopped. Iterating a converged sample on is not harmless: where M is a
    projected map, Q(HHᵀ + cI)Q, its last residual is rounding along the projected-out directions, on which M is 0,
    so α = ‖r‖²/pᵀMp is huge (measured: 1e7 instead of 6e-4 for the likelihood step's gain on Gaussian blur).
    """
    tol = tol.view(-1, *[1] * (b.dim() - 1)) if torch.is_tensor(tol) else tol
    x = x0
    r = b - apply(x)
    p = r
    rr = _dot(r, r)
    for _ in range(iters):
        active = rr.sqrt() >= tol
        if not bool(active.any()):
            break
        mp = apply(p)
        pmp = _dot(p, mp)
        # A sample whose residual is exactly 0 has p = 0; its step and direction update must be 0, not 0/0.
        alpha = torch.where(active & (pmp > 0), rr / pmp, torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * mp
        rr_next = _dot(r, r)
        beta = torch.where(rr > 0, rr_next / rr, torch.zeros_like(rr))
        p = r + beta * p  # a stopped sample: α = 0 keeps r and ‖r‖², so it stays stopped
        rr = rr_next
    return x


def prox(op, x0, y, lamb, iters, tol=0.0):
    """argmin_x ‖A x − y‖² + λ‖x − x0‖², i.e. (AᵀA + λI) x = Aᵀy + λ x0, by CG warm-started at x0.

    TReg's data-consistency step uses 5 iterations, λ = 1e-4 and tol = 1e-4.
    """
    return conjugate_gradient(
        lambda x: op.At(op.A(x)) + lamb * x, op.At(y) + lamb * x0, x0, iters, tol
    )
