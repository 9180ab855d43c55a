"""jointrank: data-free (joint) low-rank compression of LLM weights.

    import jointrank
    config = jointrank.PRESETS["paper-10"]
    result = jointrank.compress_(model, config)   # in place
    jointrank.quantize_(model, "int8")   # optional: int8/int4 factors and linear layers (pip install 'jointrank[quant]')
    jointrank.save(model, tokenizer, "out-dir", result, source="my-model")   # the manifest is built from result
    model = jointrank.load("out-dir")    # or AutoModelForCausalLM.from_pretrained("out-dir") after import jointrank
"""


from . import hf_integration as _hf_integration
from .checkpoint import load, manifest_for, read_manifest, save
from .compress import CompressionResult, compress_, merge_, plan_for
from .errors import JointRankError
from .heal import DistillSettings, heal_, healing_reference, teacher_copy
from .methods.selfgen import self_calibration
from .pipeline import Calibration, CompressionRun, Evaluation, compress_model
from .plan import PRESETS, CompressionPlan, GroupRule, JointRankConfig
from .quantize import quantize_
from .planning import make_plan
from .version import __version__

_hf_integration.register()

__all__ = [
    "Calibration", "CompressionPlan", "CompressionResult", "CompressionRun", "Evaluation", "GroupRule",
    "JointRankConfig", "JointRankError", "PRESETS",
    "compress_", "compress_model", "load", "make_plan", "manifest_for", "merge_", "plan_for", "read_manifest", "save",
    "DistillSettings", "heal_", "healing_reference", "teacher_copy", "self_calibration", "quantize_",
]
