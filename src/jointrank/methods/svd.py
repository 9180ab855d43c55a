"""svd: plain (joint) truncated SVD of the weights, the paper's data-free method (arXiv 2402.16319)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..linalg import joint_rank_k
from .registry import Method, register


@dataclass(frozen=True)
class SVDSettings:
    """Plain SVD has no hyperparameters; how it is solved is the solver's business (linalg.Solver)."""

    version: ClassVar[int] = 1


def factorise(weights, k, *, settings=None, stats=None, solver):
    return joint_rank_k(weights, k, solver=solver.name, seed=solver.seed)


register(Method("svd", "plain truncated SVD of the (stacked) weights; data-free, the paper's method", factorise,
                SVDSettings))
