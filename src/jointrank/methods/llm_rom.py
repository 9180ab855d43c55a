"""llm_rom: reduced-order modelling of each layer's output features (LLM-ROM, arXiv 2312.07046).

PCA of the unit's output y = W x on calibration text: the top-k eigenvectors U_k of E[y yᵀ] = W C Wᵀ, then
W' = U_k (U_kᵀ W): the output is projected onto its k principal directions. Stored as basis U_kᵀ W (k, d_in) and
output factor U_k. The moment is uncentred because the low-rank layer has no bias to carry a mean (Gemma and Llama
projections have none). U_k is computed without forming the d_out x d_out matrix: they are the left singular
vectors of W C^½ (C^½ from an eigendecomposition of C; nothing is inverted, so only a 1e-8 relative ridge is added,
which keeps W C^½ of full rank on short calibration so that full rank reproduces W exactly).
A joint unit takes the PCA of its stacked outputs [W_1 x; W_2 x].

In exact arithmetic this W' is the same minimiser of E‖(W - W')x‖² as svd_llm's; what differs is where C comes from:
LLM-ROM works layer by layer on the model compressed so far (sequential), so each layer corrects for the error
of the layers before it, as in the paper; svd_llm uses the dense model's statistics.
"""

from __future__ import annotations

import torch

from . import Method, register
from .common import build, check, stacked64

RIDGE = 1e-8


def sqrt_psd(second_moment: torch.Tensor) -> torch.Tensor:
    c = second_moment.to(torch.float64)
    c = (c + c.T) / 2 + RIDGE * float(torch.diagonal(c).mean().clamp_min(1e-30)) * torch.eye(c.shape[0], dtype=c.dtype)
    evals, evecs = torch.linalg.eigh(c)
    return evecs * evals.clamp_min(0).sqrt()  # C^½ up to a rotation on the right: (C^½)(C^½)ᵀ = C


def factorise(weights, k, *, option=None, stats=None, solver="auto"):
    check(weights, k)
    w = stacked64(weights)
    u, s, _ = torch.linalg.svd(w @ sqrt_psd(stats.second_moment), full_matrices=False)
    u_k = u[:, :k]
    return build(weights, u_k.T @ w, u_k, s, k)


register(Method("llm_rom", "LLM-ROM: PCA of each layer's output features on calibration text, layer by layer on the "
                "compressed model; needs calibration", factorise, needs_calibration=True, sequential=True))
