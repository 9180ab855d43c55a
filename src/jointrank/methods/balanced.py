"""balanced: joint truncated SVD with each member's rows weighted before stacking, so no member is starved.

Plain stacking minimises Σ_i ‖W_i - A_i B‖², so the member with the most energy decides the shared basis; under
grouped-query attention K has a quarter of Q's rows (on Gemma-3-270M one KV head against four query heads) and
gets what is left. Here the stacked matrix is [a_1 W_1; a_2 W_2; ...] — this minimises Σ_i a_i² ‖W_i - A_i B‖² —
and after the SVD each output factor is divided by its a_i, so A_i B still approximates W_i itself and at full rank
reproduces it exactly. Weights a_i (option):
  norm  (default) a_i = 1/‖W_i‖_F: every member's *relative* error counts the same;
  heads           a_i = sqrt(max_j d_j / d_i): a member with fewer heads (K, V under GQA) counts as if it had as
                  many as the largest, since each of its heads serves that many query heads;
  alone           a_i = 1/ε_i, ε_i = ‖W_i - best rank-k of W_i‖_F: each member's error is measured against the
                  error it would get alone at the same rank (floored at 1e-3·‖W_i‖ where that is ~0).
A unit with one member is plain SVD whatever the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..linalg import joint_rank_k
from .registry import Method, register
from .common import build, check

WEIGHTINGS = ("norm", "heads", "alone")


def member_weights(weights: list[torch.Tensor], k: int, option: str) -> list[float]:
    norms = [float(torch.linalg.matrix_norm(w.to(torch.float64))) for w in weights]
    if option == "norm":
        return [1.0 / n if n > 0 else 1.0 for n in norms]
    if option == "heads":
        largest = max(w.shape[0] for w in weights)
        return [(largest / w.shape[0]) ** 0.5 for w in weights]
    if option == "alone":
        out = []
        for w, n in zip(weights, norms):
            s = torch.linalg.svdvals(w.to(torch.float64))
            alone = float((s[k:] ** 2).sum()) ** 0.5
            out.append(1.0 / max(alone, 1e-3 * n, 1e-30))
        return out
    raise ValueError(f"unknown balancing {option!r}")


@dataclass(frozen=True)
class BalancedSettings:
    weighting: str = "norm"  # norm | heads | alone (see the module doc); `balanced:heads` sets it

    version: ClassVar[int] = 1

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")


def factorise(weights, k, *, settings=BalancedSettings(), stats=None, solver):
    check(weights, k)
    if len(weights) == 1:
        return joint_rank_k(weights, k, solver=solver.name, seed=solver.seed)
    scales = member_weights(weights, k, settings.weighting)
    scaled = joint_rank_k([w.to(torch.float64) * a for w, a in zip(weights, scales)], k, solver=solver.name,
                          seed=solver.seed)
    # unscale each member's output factor: A_i = (a_i A_i) / a_i, so A_i B approximates the unscaled W_i
    out = torch.cat([o.to(torch.float64) / a for o, a in zip(scaled.outs, scales)], dim=0)
    return build(weights, scaled.basis.to(torch.float64), out, scaled.singular_values, k)


register(Method("balanced", "joint SVD with members weighted before stacking (norm | heads | alone); data-free",
                factorise, BalancedSettings, options=WEIGHTINGS, default_option="norm", option_field="weighting"))
