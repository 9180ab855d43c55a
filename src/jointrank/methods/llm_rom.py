"""llm_rom: reduced-order modelling of each layer's output features (LLM-ROM, arXiv 2312.07046).

PCA of the unit's output y = W x on calibration text: the top-k eigenvectors U_k of E[y yᵀ] = W C Wᵀ, then
W' = U_k (U_kᵀ W): the output is projected onto its k principal directions. Stored as basis U_kᵀ W (k, d_in) and
output factor U_k. The moment is uncentred because the low-rank layer has no bias to carry a mean (Gemma and Llama
projections have none). U_k is computed without forming the d_out x d_out matrix: they are the left singular
vectors of W L for any square root L Lᵀ = C (the Cholesky factor; nothing is inverted, so only a 1e-8 relative
ridge is added, which keeps W L of full rank on short calibration so that full rank reproduces W exactly).
A joint unit takes the PCA of its stacked outputs [W_1 x; W_2 x].

In exact arithmetic this W' is the same minimiser of E‖(W - W')x‖² as svd_llm's; what differs is where C comes from:
LLM-ROM works layer by layer on the model compressed so far (sequential), so each layer corrects for the error
of the layers before it, as in the paper; svd_llm uses the dense model's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .registry import Method, register
from .common import build, check, stacked64, top_right
from .svd_llm import cholesky_factor

RIDGE = 1e-8


@dataclass(frozen=True)
class LLMROMSettings:
    ridge: float = RIDGE  # relative ridge added to C before its Cholesky factor (keeps W L of full rank)

    version: ClassVar[int] = 1

    def __post_init__(self):
        if not 0 <= float(self.ridge) < 1:
            raise ValueError(f"ridge must be in [0, 1); got {self.ridge}")


def factorise(weights, k, *, settings=LLMROMSettings(), stats=None, solver=None):  # the solver does not apply here
    check(weights, k)
    w = stacked64(weights)
    # any square root L of C (L Lᵀ = C) gives W L (W L)ᵀ = W C Wᵀ: the Cholesky factor is the cheapest one
    m = w @ cholesky_factor(stats.second_moment, float(settings.ridge))
    s, vk = top_right(m, k)
    u_k = (m @ vk.T) / s[:k].clamp_min(1e-300)  # left singular vectors: the principal output directions
    return build(weights, u_k.T @ w, u_k, s, k)


register(Method("llm_rom", "LLM-ROM: PCA of each layer's output features on calibration text, layer by layer on the "
                "compressed model; needs calibration", factorise, LLMROMSettings, needs_calibration=True,
                sequential=True))
