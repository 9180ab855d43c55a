"""The method registry: a Method record per decomposition, registered by its own module on import."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import JointRankError
from ..linalg import Factors, Solver


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # factorise(weights, k, *, settings, stats, solver: linalg.Solver) -> Factors, on the weights' device
    factorise: Callable[..., Factors]
    # the method's hyperparameters: a frozen dataclass with defaults and a `version` ClassVar, stored in manifests;
    # the registry is keyed by it too, so a settings value says which method it configures
    settings: type
    needs_calibration: bool = False
    # data-aware only: statistics of layer i come from the model with layers < i already compressed (LLM-ROM,
    # GPTQ-style), instead of from the dense model (ASVD, SVD-LLM as published)
    sequential: bool = False
    options: tuple[str, ...] = ()  # the values NAME:OPTION accepts, which set the settings field `option_field`
    default_option: str | None = None
    option_field: str | None = None


_REGISTRY: dict[str, Method] = {}
_BY_SETTINGS: dict[type, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY or method.settings in _BY_SETTINGS:
        raise ValueError(f"method {method.name!r} (or its settings type) is registered twice")
    _REGISTRY[method.name] = method
    _BY_SETTINGS[method.settings] = method
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


def method_of(settings) -> Method:
    """The method a settings value belongs to (the registry keyed by settings type)."""
    if type(settings) not in _BY_SETTINGS:
        raise JointRankError(f"{type(settings).__name__} is not the settings of a registered method")
    return _BY_SETTINGS[type(settings)]


def settings_for(spec, params: dict | None = None):
    """The full, typed settings of a method: from a spec ('svd_llm', 'balanced:heads') and optional overrides
    ({'damping': 0.05}), or a settings value as is. Unknown names and bad values: one clear error."""
    if not isinstance(spec, str):
        method_of(spec)
        return spec
    method, option = parse(spec)
    values = {method.option_field: option} if method.option_field and option else {}
    fields = {f.name: f for f in dataclasses.fields(method.settings)}
    for key, value in (params or {}).items():
        if key not in fields:
            raise JointRankError(f"method {method.name!r} has no setting {key!r} (settings: "
                                 f"{', '.join(fields) or 'none'})")
        default = fields[key].default
        if isinstance(value, str) and not isinstance(default, str):  # from the command line: the setting's type
            try:
                value = type(default)(value)
            except ValueError:
                raise JointRankError(f"method {method.name!r}: {key} must be a {type(default).__name__}; got "
                                     f"{value!r}") from None
        values[key] = value
    try:
        return method.settings(**values)
    except (TypeError, ValueError) as exc:
        raise JointRankError(f"method {method.name!r}: {exc}") from None


def settings_dict(spec, params: dict | None = None) -> dict:
    """What a manifest records: the method's name, its settings' version and every setting, defaults included."""
    method, _ = parse(spec) if isinstance(spec, str) else (method_of(spec), None)
    settings = settings_for(spec, params)
    return {"name": method.name, "version": type(settings).version, **dataclasses.asdict(settings)}


def factorise(spec, weights: list[torch.Tensor], k: int, *, stats=None, solver: Solver | str = "auto",
              params: dict | None = None) -> Factors:
    """One unit's factors by the method `spec` names (or a settings value; `params` override settings).
    `solver`: a linalg.Solver (name, seed, device) or a solver name; with a device, the weights and statistics
    are moved there and the factors come back there."""
    if isinstance(spec, str):
        method, _ = parse(spec)
        settings = settings_for(spec, params)
    else:
        method, settings = method_of(spec), spec
    solver = Solver.of(solver)
    if method.needs_calibration and stats is None:
        raise JointRankError(f"method {method.name!r} needs calibration text (--calibration FILE)")
    if solver.device is not None:
        weights = [w.to(solver.device) for w in weights]
        stats = stats.to(solver.device) if stats is not None else None
    return method.factorise(weights, k, settings=settings, stats=stats, solver=solver)
