"""svd_llm: truncation-aware whitening (SVD-LLM, arXiv 2403.07378).

With C = E[x xᵀ] the second moment of the unit's input on calibration text, damped to C + λ·mean(diag C)·I
(λ = 0.01, as GPTQ), and S its Cholesky factor (C = S Sᵀ): SVD of W S = U Σ Vᵀ, keep k, W' = U_k Σ_k V_kᵀ S⁻¹.
Then ‖(W - W')S‖_F² = E‖(W - W')x‖² (+ the damping term), so truncating the k-th singular value costs exactly
σ_k² of output error: this W' is the best rank-k approximation in that metric, and its output error is never above
plain SVD's (the damping term only favours the smaller weight-space error, which SVD has). Stored as basis
V_kᵀ S⁻¹ (a triangular solve, not an inverse) and output factor U_k Σ_k. A joint unit whitens its stacked members
with the one S of their shared input: a joint whitened decomposition. Statistics from the dense model, as published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .registry import Method, register
from .common import build, check, stacked64, top_right

DAMPING = 0.01


def damped_moment(second_moment: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, float]:
    """(C symmetrised in float64, λ·mean(diag C)): the moment and the first ridge the Cholesky factor adds to it."""
    c = second_moment.to(torch.float64)
    c = (c + c.T) / 2
    return c, damping * float(torch.diagonal(c).mean().clamp_min(1e-12))


def cholesky_factor(second_moment: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    c, lam = damped_moment(second_moment, damping)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    for _ in range(6):  # raise the damping until the factorisation succeeds (rank-deficient calibration)
        factor, info = torch.linalg.cholesky_ex(c + lam * eye)
        if int(info) == 0:
            return factor
        lam *= 10
    raise ValueError("the calibration second moment is not positive definite even after damping")


@dataclass(frozen=True)
class SVDLLMSettings:
    damping: float = DAMPING  # λ: C + λ·mean(diag C)·I before the Cholesky factor

    version: ClassVar[int] = 1

    def __post_init__(self):
        if not 0 <= float(self.damping) < 1:
            raise ValueError(f"damping must be in [0, 1); got {self.damping}")


def factorise(weights, k, *, settings=SVDLLMSettings(), stats=None, solver=None):  # the solver does not apply here
    check(weights, k)
    s_chol = cholesky_factor(stats.second_moment, float(settings.damping))
    whitened = stacked64(weights) @ s_chol
    s, vk = top_right(whitened, k)
    # basis = V_kᵀ S⁻¹  <=>  Sᵀ basisᵀ = V_k: an upper-triangular solve
    basis = torch.linalg.solve_triangular(s_chol.T, vk.T, upper=True).T
    return build(weights, basis, whitened @ vk.T, s, k)  # (W S) V_k = U_k Σ_k


register(Method("svd_llm", "SVD-LLM: SVD of the weights whitened by the Cholesky factor of the damped input "
                "second moment; needs calibration", factorise, SVDLLMSettings, needs_calibration=True,
                sequential=False))
