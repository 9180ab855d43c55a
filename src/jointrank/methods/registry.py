"""The method registry: a Method record per decomposition, registered by its own module on import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import JointRankError
from ..linalg import Factors, Solver


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # factorise(weights, k, *, option, stats, solver: linalg.Solver) -> Factors, on the weights' device
    factorise: Callable[..., Factors]
    needs_calibration: bool = False
    # data-aware only: statistics of layer i come from the model with layers < i already compressed (LLM-ROM,
    # GPTQ-style), instead of from the dense model (ASVD, SVD-LLM as published)
    sequential: bool = False
    options: tuple[str, ...] = ()
    default_option: str | None = None


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def available() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def parse(spec: str) -> tuple[Method, str | None]:
    """'balanced:heads' -> (the balanced method, 'heads'); one clear error for an unknown name or option."""
    name, _, option = (spec or "svd").strip().partition(":")
    method = _REGISTRY.get(name)
    if method is None:
        raise JointRankError(f"unknown method {name!r}; available: {', '.join(available())}")
    if option and option not in method.options:
        allowed = ", ".join(method.options) if method.options else "none"
        raise JointRankError(f"method {name!r} has no option {option!r} (options: {allowed})")
    return method, option or method.default_option


def factorise(spec: str, weights: list[torch.Tensor], k: int, *, stats=None,
              solver: Solver | str = "auto") -> Factors:
    """One unit's factors by the method `spec` names. `solver`: a linalg.Solver (name, seed, device) or a solver
    name; with a device, the weights and statistics are moved there and the factors come back there."""
    method, option = parse(spec)
    solver = Solver.of(solver)
    if method.needs_calibration and stats is None:
        raise JointRankError(f"method {method.name!r} needs calibration text (--calibration FILE)")
    if solver.device is not None:
        weights = [w.to(solver.device) for w in weights]
        stats = stats.to(solver.device) if stats is not None else None
    return method.factorise(weights, k, option=option, stats=stats, solver=solver)
