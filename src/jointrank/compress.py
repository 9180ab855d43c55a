"""Apply a CompressionPlan to an in-memory model: the only step that changes weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .architectures import count_parameters, decoder_layers, describe
from .errors import JointRankError
from .finite import check_factors
from .modules import LowRankLinear, SharedBasis
from .plan import CompressionPlan, JointRankConfig, make_plan


@dataclass
class UnitResult:
    layer: int
    group: str
    method: str
    members: tuple[str, ...]
    rank: int
    energy_kept: float
    rel_error: float
    member_rel_errors: list[float]
    solver: str = ""  # the solver that ran (Factors.solver); empty for methods that do not say


@dataclass
class CompressionResult:
    plan: CompressionPlan
    units: list[UnitResult]
    params_total_before: int
    params_total_after: int  # measured from the tensors after replacement
    params_decoder_before: int
    params_decoder_after: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "params": {
                "total_before": self.params_total_before,
                "total_after": self.params_total_after,
                "decoder_before": self.params_decoder_before,
                "decoder_after": self.params_decoder_after,
            },
            "seconds": self.seconds,
            "units": [vars(u) for u in self.units],
            **({"extra": self.extra} if self.extra else {}),
        }


def plan_for(model: nn.Module, config: JointRankConfig) -> CompressionPlan:
    from .finite import check_weights

    check_weights(model.named_parameters())  # NaN/Inf: refused before any planning or factorising
    if getattr(config, "allocation", "uniform") == "global":  # ranks chosen from the weights' spectra
        from .methods.allocation import plan_global

        return plan_global(model, config)
    return make_plan(describe(model), config)


def compress_(model: nn.Module, config: JointRankConfig | CompressionPlan, *, device: str | None = None,
              progress: bool = True, calibration=None) -> CompressionResult:
    """Compress `model` in place following a config (planned here) or a ready plan; returns what was done.

    The SVDs run on `device` (default: where each weight lives), in float32 or better; the factors are stored in
    the weight's own dtype and device. The decomposition is the config's `method` (jointrank.methods; default
    "svd"); a data-aware method needs `calibration` (methods.calibration.load_text).
    """
    start = time.perf_counter()
    layout = describe(model)
    if isinstance(config, CompressionPlan):
        from .finite import check_weights

        check_weights(model.named_parameters())  # NaN/Inf: refused before any work (plan_for checks otherwise)
        plan = config
        solver = plan.config.get("solver", "auto")
    else:
        plan = plan_for(model, config)
        solver = config.solver
    _check_plan_fits(plan, layout)
    from . import methods

    spec = plan.config.get("method", "svd")
    method, _ = methods.parse(spec)
    results = []
    work = plan.factorised
    extra = {}
    if method.needs_calibration:
        from .methods.apply import compress_calibrated

        done, extra = compress_calibrated(model, plan, calibration, solver=solver, progress=progress,
                                          install=lambda entry, factors: (check_factors(entry, factors),
                                                                         install_factors(model, entry, factors)))
    else:
        done = []
        for entry in tqdm(work, desc="factorising", unit="unit", disable=not progress or not work):
            modules = [model.get_submodule(name) for name in entry.members]
            weights = [m.weight.detach().to(device) if device else m.weight.detach() for m in modules]
            factors = methods.factorise(spec, weights, entry.rank, solver=solver)
            check_factors(entry, factors)
            install_factors(model, entry, factors)
            done.append((entry, factors))
    for entry, factors in done:
        results.append(UnitResult(entry.layer, entry.group, entry.method, entry.members, entry.rank,
                                  factors.energy_kept, factors.rel_error, factors.member_rel_errors,
                                  factors.solver))
    attach_quantization_config(model, plan)
    _, layers = decoder_layers(model)
    return CompressionResult(
        plan=plan,
        units=results,
        params_total_before=layout.params_total,
        params_total_after=count_parameters(model),
        params_decoder_before=layout.params_decoder,
        params_decoder_after=count_parameters(layers),
        seconds=time.perf_counter() - start,
        extra=extra,
    )


def install_factors(model: nn.Module, entry, factors) -> None:
    """Replace one plan unit's dense members by low-rank modules holding `factors` (any method's)."""
    modules = [model.get_submodule(name) for name in entry.members]
    install_unit(model, entry.members, entry.rank, shared=entry.method == "joint", group=entry.group)
    _load_factors(model, entry.members, factors, originals=modules, shared=entry.method == "joint")


def _check_plan_fits(plan: CompressionPlan, layout) -> None:
    shapes = {m.name: (m.d_out, m.d_in) for g in layout.groups for m in g.members}
    for e in plan.entries:
        for name, d_out in zip(e.members, e.d_outs):
            if shapes.get(name) != (d_out, e.d_in):
                raise JointRankError(f"the plan does not fit this model: {name} is {shapes.get(name)}, "
                                     f"the plan expects {(d_out, e.d_in)}")


def basis_name(parent: str, group: str) -> str:
    return f"{parent}.{group}_basis"


def install_unit(model: nn.Module, members: tuple[str, ...] | list[str], rank: int, *, shared: bool,
                 group: str) -> None:
    """Swap the members' nn.Linear for LowRankLinear of the given rank (weights uninitialised).

    Used both when compressing and when transformers rebuilds a saved checkpoint on the meta device, so the two
    paths cannot disagree on module structure or state-dict names.
    """
    originals = [model.get_submodule(name) for name in members]
    ref = originals[0].weight
    factory = {"device": ref.device, "dtype": ref.dtype}
    basis = None
    if shared:
        parent_name = members[0].rsplit(".", 1)[0]
        basis = SharedBasis(rank, originals[0].in_features, len(members), **factory)
        model.get_submodule(parent_name).add_module(basis_name(parent_name, group).rsplit(".", 1)[1], basis)
    for name, old in zip(members, originals):
        parent_name, attr = name.rsplit(".", 1)
        new = LowRankLinear(old.in_features, old.out_features, rank, old.bias is not None, shared_basis=basis,
                            **factory)
        setattr(model.get_submodule(parent_name), attr, new)


@torch.no_grad()
def _load_factors(model, members, factors, *, originals, shared: bool) -> None:
    for i, (name, old) in enumerate(zip(members, originals)):
        new = model.get_submodule(name)
        dtype, device = old.weight.dtype, old.weight.device
        new.out.weight.copy_(factors.outs[i].to(device=device, dtype=dtype))
        if old.bias is not None:
            new.out.bias.copy_(old.bias)  # biases are kept exact
        if shared:
            if i == 0:
                new.shared_basis.weight.copy_(factors.basis.to(device=device, dtype=dtype))
        else:
            new.basis.weight.copy_(factors.basis.to(device=device, dtype=dtype))


def units_of(plan: CompressionPlan) -> list[dict]:
    """The module structure a checkpoint needs to be rebuilt: what goes into config.json's quantization_config."""
    return [{"group": e.group, "members": list(e.members), "rank": e.rank, "shared": e.method == "joint"}
            for e in plan.factorised]


def attach_quantization_config(model: nn.Module, plan: CompressionPlan) -> None:
    from .hf_integration import JointRankQuantizationConfig, JointRankHfQuantizer

    qconfig = JointRankQuantizationConfig(units=units_of(plan))
    model.config.quantization_config = qconfig
    model.hf_quantizer = JointRankHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = "jointrank"


@torch.no_grad()
def merge_(model: nn.Module) -> int:
    """Write every low-rank layer back into a dense nn.Linear of the original shape; returns how many."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.out.weight.device, dtype=module.out.weight.dtype)
            dense.weight.copy_(module.dense_weight())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, dense)
            merged += 1
    for name, module in list(model.named_modules()):
        if isinstance(module, SharedBasis):
            parent, attr = name.rsplit(".", 1)
            delattr(model.get_submodule(parent), attr)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False
    return merged
