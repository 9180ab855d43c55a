"""svd: plain (joint) truncated SVD of the weights, the paper's data-free method (arXiv 2402.16319)."""

from __future__ import annotations

from ..linalg import joint_rank_k
from .registry import Method, register


def factorise(weights, k, *, option=None, stats=None, solver):
    return joint_rank_k(weights, k, solver=solver.name, seed=solver.seed)


register(Method("svd", "plain truncated SVD of the (stacked) weights; data-free, the paper's method", factorise))
