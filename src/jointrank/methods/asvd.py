"""asvd: activation-aware SVD (arXiv 2312.05821): scale input channels by their activation size, truncate, unscale.

W ≈ (W S)_k S⁻¹ with S = diag(mean|x_j|^α), α = 0.5 (the paper's default): channels that carry large activations
(the outliers of LLM hidden states) are preserved first. The basis V_kᵀ S⁻¹ is stored as is (not orthonormal). A
joint unit scales its stacked members with the one S of their shared input. Heuristic: unlike svd_llm it is not
the minimiser of the output error, so it can lose to plain SVD on a unit; the tests and results measure how often.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .registry import Method, register
from .common import build, check, stacked64, top_right

ALPHA = 0.5


@dataclass(frozen=True)
class ASVDSettings:
    alpha: float = ALPHA  # the exponent of mean |x_j| in the channel scale

    version: ClassVar[int] = 1

    def __post_init__(self):
        if not 0 <= float(self.alpha) <= 2:
            raise ValueError(f"alpha must be in [0, 2]; got {self.alpha}")


def factorise(weights, k, *, settings=ASVDSettings(), stats=None, solver=None):  # the solver does not apply here
    check(weights, k)
    scale = stats.mean_abs.to(torch.float64).clamp_min(0) ** float(settings.alpha)
    # a channel that never fired would get scale 0 and an infinite inverse: give it the smallest positive scale
    positive = scale[scale > 0]
    scale = scale.clamp_min(float(positive.min()) if positive.numel() else 1.0)
    scaled = stacked64(weights) * scale
    s, vk = top_right(scaled, k)
    return build(weights, vk / scale, scaled @ vk.T, s, k)


register(Method("asvd", "activation-aware SVD: input channels scaled by mean |activation|^0.5; needs calibration",
                factorise, ASVDSettings, needs_calibration=True, sequential=False))
