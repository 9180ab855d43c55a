"""Make `import jointrank; AutoModelForCausalLM.from_pretrained(dir)` load a compressed checkpoint, no remote code.

transformers lets a package register a quantization method: config.json carries
`quantization_config = {"quant_method": "jointrank", "units": [...]}` and, before the weights load, our quantizer
swaps the listed nn.Linear modules (still on the meta device) for LowRankLinear of the stored ranks, then (format 2,
`"weights": {...}`) the listed linear layers and factors for quantised ones (quantize.py). The tensors then load by
name like any other checkpoint's.
"""

from __future__ import annotations

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

METHOD = "jointrank"
# 1: low-rank units only; 2: also quantised weights ("weights", see quantize.py). A checkpoint without quantised
# weights is still written as 1, so older jointrank versions keep reading it.
FORMAT_VERSION = 1
FORMAT_VERSIONS = (1, 2)


class JointRankQuantizationConfig(QuantizationConfigMixin):
    def __init__(self, units: list[dict] | None = None, format_version: int | None = None,
                 weights: dict | None = None, **kwargs):
        self.quant_method = METHOD
        self.units = list(units or [])
        self.weights = weights or None
        self.format_version = format_version if format_version is not None else (2 if self.weights else 1)
        if self.format_version not in FORMAT_VERSIONS:
            raise ValueError(f"jointrank checkpoint format {self.format_version} is not supported by this version")

    def to_dict(self) -> dict:
        out = {"quant_method": self.quant_method, "format_version": self.format_version, "units": self.units}
        if self.weights:
            out["weights"] = self.weights
        return out


class JointRankHfQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .modules import install_unit
        from .verify import install_units, verify_on_load

        from .quantize import install_quantized

        install_units(model, self.quantization_config.units, install_unit)
        install_quantized(model, self.quantization_config.weights)
        # transformers would fill a missing tensor with random values and ignore an extra one (a warning only):
        # refuse a checkpoint whose tensors are not exactly what these units and the architecture imply
        verify_on_load(model, checkpoint_files, self.quantization_config.units)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .modules import relayout_

        relayout_(model)  # loading assigns the stored (row-major) tensors
        return model

    def is_serializable(self, **kwargs):
        return True

    @property
    def is_trainable(self):
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # the factors are ordinary parameters, so the model fine-tunes like a dense one: without this,
        # transformers' Trainer refuses it as "purely quantized" unless adapters are attached
        return True


def register() -> None:
    # Idempotent: importing jointrank twice (or reloading in a notebook) must not raise "already registered".
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(JointRankQuantizationConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(JointRankHfQuantizer)
