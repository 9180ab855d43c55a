"""Planning: a JointRankConfig and a model's layout in, a CompressionPlan out, before any weight changes.

One entry point, `make_plan`, behind which sit the planners: uniform (one ratio for every unit; shapes alone) and
global (every unit's rank chosen together under one budget from the weights' spectra; it reads the weights through
`tensors`, a model's (ModelTensors) or a safetensors checkpoint's (stream.TensorSource), so the in-memory and the
streaming paths plan identically).
"""

from __future__ import annotations

from ..architectures import ModelLayout
from ..errors import JointRankError
from ..plan import CompressionPlan, JointRankConfig, validate
from .allocation import plan_global
from .loss import plan_loss
from .uniform import plan_uniform, plan_units


class ModelTensors:
    """A model's weights as a tensor reader: the same two calls a safetensors checkpoint answers."""

    def __init__(self, model):
        self.state = model.state_dict()  # references, not copies

    def names(self) -> list[str]:
        return list(self.state)

    def read(self, names: list[str]) -> dict:
        return {n: self.state[n].detach() for n in names}


def make_plan(layout: ModelLayout, config: JointRankConfig, *, tensors=None, spectra: dict | None = None,
              curves: dict | None = None) -> CompressionPlan:
    """The plan `config` asks for. Global allocation needs `tensors` (it reads the weights); `spectra` is its
    optional cache (see plan_global). Loss-aware allocation needs the `curves` planning.loss.loss_curves measures
    (jointrank.plan_for(model, config, calibration=...) does both)."""
    validate(config)
    if config.allocation == "loss":
        if curves is None:
            raise JointRankError("loss-aware allocation measures the loss on calibration text: plan it with the "
                                 "model and the text (jointrank.plan_for(model, config, calibration=...))")
        return plan_loss(layout, config, curves)
    if config.allocation == "global":
        if tensors is None:
            raise JointRankError("global allocation chooses ranks from the weights' spectra: plan it with the weights "
                                 "(jointrank.plan_for(model, config), or make_plan(..., tensors=...))")
        return plan_global(layout, config, tensors, spectra=spectra)
    return plan_uniform(layout, config)


__all__ = ["ModelTensors", "make_plan", "plan_global", "plan_loss", "plan_uniform", "plan_units"]
