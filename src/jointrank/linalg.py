"""Rank-k and joint rank-k approximation of weight matrices. Pure functions: tensors in, factors out.

Conventions follow nn.Linear: a weight W is (d_out, d_in) and computes y = x Wᵀ. A rank-k factorisation is
W ≈ A B with B (k, d_in) the *input basis* (orthonormal rows, Vₖᵀ of the SVD) and A (d_out, k) the *output factor*
(Uₖ Sₖ). Joint rank-k stacks members that read the same input, [W_1; W_2; ...], factorises once, and splits A by rows:
every member keeps its own output factor and all share B, which is stored once (arXiv 2402.16319, Eq. 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SOLVERS = ("auto", "svd", "gram")


@dataclass
class Factors:
    """The result of one (joint) rank-k approximation."""

    basis: torch.Tensor  # (k, d_in), orthonormal rows
    outs: list[torch.Tensor]  # one (d_out_i, k) per member, in the order given
    singular_values: torch.Tensor  # all of them, descending, of the stacked matrix
    energy_kept: float  # Σ_{i<k} s_i² / Σ s_i²: the fraction of squared Frobenius norm kept
    rel_error: float  # ‖W - A B‖_F / ‖W‖_F of the stacked matrix, = sqrt(1 - energy_kept)
    member_rel_errors: list[float]  # the same, measured for each member on its own

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def reconstruct(self, member: int = 0) -> torch.Tensor:
        return self.outs[member] @ self.basis


def joint_params(d_outs: list[int] | tuple[int, ...], d_in: int, k: int) -> int:
    """Parameters of a joint rank-k factorisation: k·(Σ d_out_i + d_in), the paper's Eq. 9 (biases not included)."""
    return k * (sum(d_outs) + d_in)


def max_rank(d_outs: list[int] | tuple[int, ...], d_in: int) -> int:
    return min(sum(d_outs), d_in)


def rank_k(weight: torch.Tensor, k: int, solver: str = "auto") -> Factors:
    """Best rank-k approximation of one matrix in Frobenius and spectral norm (Eckart–Young)."""
    return joint_rank_k([weight], k, solver=solver)


def joint_rank_k(weights: list[torch.Tensor], k: int, solver: str = "auto") -> Factors:
    """Joint rank-k approximation of matrices that read the same input (same d_in), stacked along d_out.

    The arithmetic is float32 at least (float64 for the Gram solver) whatever the storage dtype, because bfloat16
    SVDs lose the small singular values this method is deciding about. Factors come back in float32 on the input's
    device; the caller casts them to the model's dtype.
    """
    if not weights:
        raise ValueError("joint_rank_k needs at least one matrix")
    d_in = weights[0].shape[1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != d_in:
            raise ValueError(f"members must be 2-D with the same d_in; got {[tuple(x.shape) for x in weights]}")
    d_outs = [w.shape[0] for w in weights]
    limit = max_rank(d_outs, d_in)
    if not 1 <= k <= limit:
        raise ValueError(f"rank {k} is out of range for a {sum(d_outs)}x{d_in} matrix (1 to {limit})")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")

    stacked = torch.cat([w.to(torch.float32) for w in weights], dim=0)
    if solver == "auto":
        # Gram + eigh is several times faster than a full SVD when one side is much smaller than the other,
        # and float64 keeps its accuracy (the Gram matrix squares the condition number).
        solver = "gram" if max(stacked.shape) >= 2 * min(stacked.shape) else "svd"
    if solver == "svd":
        u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        basis, out = vh[:k], u[:, :k] * s[:k]
    else:
        s, basis = _gram_svd(stacked, k)
        out = stacked @ basis.T  # = U_k S_k, exact for the chosen basis

    total = float((s.double() ** 2).sum())
    kept = float((s[:k].double() ** 2).sum())
    energy = kept / total if total > 0 else 1.0
    outs = list(torch.split(out, d_outs, dim=0))
    member_errors = []
    for w, a in zip(weights, outs):
        w32 = w.to(torch.float32)
        norm = float(torch.linalg.matrix_norm(w32))
        member_errors.append(float(torch.linalg.matrix_norm(w32 - a @ basis)) / norm if norm > 0 else 0.0)
    return Factors(
        basis=basis.contiguous(),
        outs=[a.contiguous() for a in outs],
        singular_values=s,
        energy_kept=energy,
        rel_error=max(0.0, 1.0 - energy) ** 0.5,
        member_rel_errors=member_errors,
    )


def _gram_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k right singular vectors (k, d_in) and all singular values, from the eigenvectors of MᵀM or MMᵀ."""
    m64 = matrix.to(torch.float64)
    rows, cols = m64.shape
    if cols <= rows:
        evals, evecs = torch.linalg.eigh(m64.T @ m64)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        basis = evecs[:, :k].T
    else:
        # Wide matrix: eigenvectors of MMᵀ are the left vectors; right ones are Mᵀu / s.
        evals, evecs = torch.linalg.eigh(m64 @ m64.T)
        evals, evecs = evals.flip(0), evecs.flip(1)
        top = evecs[:, :k]
        right = m64.T @ top
        basis = (right / right.norm(dim=0, keepdim=True).clamp_min(1e-300)).T
    s = evals.clamp_min(0).sqrt()
    return s.to(torch.float32), basis.to(torch.float32)


def spectrum(weights: list[torch.Tensor]) -> torch.Tensor:
    """Singular values of the stacked matrix, descending (for plans that choose ranks from energy)."""
    stacked = torch.cat([w.to(torch.float32) for w in weights], dim=0)
    return torch.linalg.svdvals(stacked)
