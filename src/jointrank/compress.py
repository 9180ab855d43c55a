"""Apply a CompressionPlan to an in-memory model: the only step that changes weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .architectures import count_parameters, decoder_layers, describe
from .engine import UnitResult, run_unit
from .errors import JointRankError
from .format import basis_name, is_shared, quantization_units, unit_tensors
from .linalg import Solver
from .modules import install_unit, merge_
from .plan import CompressionPlan, JointRankConfig, check_plan_fits, validate
from .planning import ModelTensors, make_plan

# Older names, kept for code that imported them from here: the format owns the names, modules the structure.
units_of = quantization_units
__all__ = ["CompressionResult", "UnitResult", "basis_name", "compress_", "install_factors", "install_unit",
           "merge_", "plan_for", "units_of"]


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


def plan_for(model: nn.Module, config: JointRankConfig, *, spectra: dict | None = None, calibration=None,
             progress: bool = True) -> CompressionPlan:
    """The plan for this model (global allocation reads its weights; `spectra` caches them across budgets;
    loss-aware allocation measures the loss on `calibration`)."""
    from .finite import check_weights

    validate(config)  # a bad config is refused before the model is run on calibration text
    check_weights(model.named_parameters())  # NaN/Inf: refused before any planning or factorising
    layout = describe(model)
    curves = None
    if config.allocation == "loss":
        if calibration is None:
            raise JointRankError("--allocation loss estimates each truncation's cost on calibration text: give "
                                 "--calibration FILE, or --calibration self (no user data)")
        from .planning.loss import loss_curves

        curves = loss_curves(model, calibration, layout, config, progress=progress)
    return make_plan(layout, config, tensors=ModelTensors(model), spectra=spectra, curves=curves)


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
    else:
        plan = plan_for(model, config, calibration=calibration, progress=progress)
    solver = Solver(plan.config.get("solver", "auto"), plan.config.get("seed"), device)
    check_plan_fits(plan, layout)
    from . import methods

    spec = plan.config.get("method", "svd")
    method, _ = methods.parse(spec)
    settings = methods.settings_for(spec, plan.config.get("method_params"))  # every hyperparameter, typed
    work = plan.factorised
    extra = {}
    if method.needs_calibration:
        from .methods.apply import compress_calibrated

        results, extra = compress_calibrated(model, plan, calibration, solver=solver, progress=progress,
                                             install=lambda entry, factors: install_factors(model, entry, factors))
    else:
        results = []
        for entry in tqdm(work, desc="factorising", unit="unit", disable=not progress or not work):
            weights = [model.get_submodule(name).weight.detach() for name in entry.members]
            factors, result, _ = run_unit(entry, weights, settings, solver=solver)
            install_factors(model, entry, factors)
            results.append(result)
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


@torch.no_grad()
def install_factors(model: nn.Module, entry, factors) -> None:
    """Replace one plan unit's dense members by low-rank modules holding `factors` (any method's): the tensors are
    named as the checkpoint format names them and copied in by those names, as a reload would."""
    originals = [model.get_submodule(name) for name in entry.members]
    ref = originals[0].weight
    biases = {name: m.bias for name, m in zip(entry.members, originals) if m.bias is not None}  # kept exact
    install_unit(model, entry.members, entry.rank, shared=is_shared(entry), group=entry.group)
    for name, tensor in unit_tensors(entry, factors, biases, dtype=ref.dtype, device=ref.device).items():
        model.get_parameter(name).copy_(tensor)


def attach_quantization_config(model: nn.Module, plan: CompressionPlan) -> None:
    from .hf_integration import JointRankQuantizationConfig, JointRankHfQuantizer

    qconfig = JointRankQuantizationConfig(units=quantization_units(plan))
    model.config.quantization_config = qconfig
    model.hf_quantizer = JointRankHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = "jointrank"
