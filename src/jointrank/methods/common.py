"""Shared arithmetic of the methods: factors of a transformed stacked matrix, and their quality measures."""

from __future__ import annotations

import torch

from ..linalg import Factors, gram_svd, max_rank


def check(weights: list[torch.Tensor], k: int) -> tuple[list[int], int]:
    if not weights:
        raise ValueError("a unit needs at least one matrix")
    d_in = weights[0].shape[1]
    if any(w.dim() != 2 or w.shape[1] != d_in for w in weights):
        raise ValueError(f"members must be 2-D with the same d_in; got {[tuple(w.shape) for w in weights]}")
    d_outs = [w.shape[0] for w in weights]
    if not 1 <= k <= max_rank(d_outs, d_in):
        raise ValueError(f"rank {k} is out of range for a {sum(d_outs)}x{d_in} unit (1 to {max_rank(d_outs, d_in)})")
    return d_outs, d_in


def stacked64(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.to(torch.float64) for w in weights], dim=0)


def top_right(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All singular values of m and its top-k right singular vectors (k, d_in), both float64, through the small
    Gram matrix (linalg's float64 solver): one eigendecomposition of min(rows, cols)², not a full SVD of m."""
    s, vk = gram_svd(m, k)
    return s.to(torch.float64), vk.to(torch.float64)


def build(weights: list[torch.Tensor], basis: torch.Tensor, out: torch.Tensor, s: torch.Tensor, k: int) -> Factors:
    """Factors from a stacked output factor `out` (Σd_out, k) and `basis` (k, d_in); `s` = the spectrum the method
    truncated (of the weights, or of the weights in the method's metric), so energy_kept is in that metric."""
    d_outs = [w.shape[0] for w in weights]
    s = s.to(torch.float64)
    total = float((s**2).sum())
    energy = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    outs = [a.to(torch.float32).contiguous() for a in torch.split(out, d_outs, dim=0)]
    basis32 = basis.to(torch.float32).contiguous()
    errors = []
    for w, a in zip(weights, outs):  # a report, not a decision: float32 is plenty
        w32 = w.to(torch.float32)
        norm = float(torch.linalg.matrix_norm(w32))
        errors.append(float(torch.linalg.matrix_norm(w32 - a @ basis32)) / norm if norm > 0 else 0.0)
    return Factors(basis=basis32, outs=outs, singular_values=s.to(torch.float32), energy_kept=energy,
                   rel_error=max(0.0, 1.0 - energy) ** 0.5, member_rel_errors=errors)


def output_error(weights: list[torch.Tensor], factors: Factors, second_moment: torch.Tensor) -> float:
    """Relative output error on calibration inputs: sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)), C = E[x xᵀ] (undamped).

    This is what the data-aware methods minimise: E‖(W - W')x‖² over the calibration tokens, relative to E‖Wx‖².
    """
    w = stacked64(weights)
    approx = torch.cat([a.to(torch.float64) for a in factors.outs], dim=0) @ factors.basis.to(torch.float64)
    delta = w - approx
    c = second_moment.to(torch.float64)
    num = float(torch.einsum("ij,jk,ik->", delta, c, delta))
    den = float(torch.einsum("ij,jk,ik->", w, c, w))
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
