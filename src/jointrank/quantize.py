"""Weight-only quantisation of what a compressed model keeps: the low-rank factors and the dense linear layers left.

    jointrank compress MODEL --target 0.2 --scope decoder --quantize int4

Low rank and quantisation compose: a rank cut removes parameters, quantisation shrinks the bytes of each one that
remains. Both schemes are data-free (no calibration text) and weight-only (activations stay in the model's dtype):

  int8  one scale per output channel, symmetric (absmax)
  int4  groups of 128 consecutive weights along the input, each with a scale and a zero point fitted by the
        half-quadratic optimiser of HQQ (data-free, lower error than min/max rounding)
  int4-g32  the same in groups of 32 (llama.cpp's Q4 block size): more accurate, more bytes of scales

The arithmetic and the kernels are optimum-quanto's (pip install 'jointrank[quant]'): a pure-Python wheel that
runs on CPU with torch 2.13 and ships HQQ's optimiser. torchao's 4-bit CPU layout needs a packing op this torch build
lacks, and compressed-tensors only defines storage. What is stored is ours, as plain tensors, so a checkpoint still
loads through `AutoModelForCausalLM.from_pretrained` after `import jointrank` like any other (the quantizer in
hf_integration rebuilds these modules on the meta device from config.json, then the tensors load by name):

  <m>.quantized.qdata   int8 (d_out, d_in); int4: uint8, two 4-bit values per byte, in quanto's group layout
  <m>.quantized.qscale  float, one per output channel (int8) or per group (int4)
  <m>.quantized.qshift  int4 only: float zero point per group
  [<m>.bias   unchanged]

for every quantised module <m>: each nn.Linear of the decoder layers, each factor of a LowRankLinear (its basis and
out) and each joint group's shared basis. Embeddings, norms and the output head stay as they were.

Quantised weights are dequantized inside each matmul: on a CPU this decodes slower than float32 (bench/ numbers in
results/quantize.md say how much); the gain is bytes on disk and in memory.

Healing can see the rounding (`fake_quantize_`, used by heal_ with DistillSettings.quantized_steps): each weight's
grid (scale, zero point) is fitted once, the forward uses the weight rounded on it, the gradient passes straight
through to the float weight, and quantize_ stores the trained weights on those same grids, so the saved model
computes what was trained.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import JointRankError

LIBRARY = "optimum-quanto"
INSTALL = "pip install 'jointrank[quant]'  (optimum-quanto)"
FORMAT_VERSION = 1  # of the "weights" entry of quantization_config below


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int
    group_size: int | None  # None: one scale per output channel
    optimizer: str  # how scales are fitted: "absmax" (symmetric) or "hqq" (affine, half-quadratic)
    about: str


SCHEMES = {
    "int8": Scheme("int8", 8, None, "absmax", "8-bit, one scale per output channel"),
    "int4": Scheme("int4", 4, 128, "hqq", "4-bit, groups of 128 with scale and zero point (HQQ)"),
    "int4-g32": Scheme("int4-g32", 4, 32, "hqq", "4-bit, groups of 32 (llama.cpp's Q4 block), more scales"),
}
# int4 groups run along the input; a dimension the scheme's group size does not divide (a rank of 137) takes the
# largest of these up to it that does, then the output axis, else that tensor stays at 8 bits (see spec_for)
GROUP_FALLBACKS = (128, 64, 32)


@dataclass(frozen=True)
class WeightSpec:
    """How one (d_out, d_in) weight is stored: bits, quantisation axis (0: per output row groups along the input;
    -1: groups along the output) and group size (None: per channel). A pure function of scheme and shape, so a
    reader rebuilds it from config.json without storing it per module."""

    bits: int
    axis: int
    group_size: int | None

    def shapes(self, d_out: int, d_in: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Stored tensor name -> (shape, dtype; None = the model's float dtype)."""
        if self.bits == 8:
            return {"qdata": ((d_out, d_in), torch.int8), "qscale": ((d_out, 1), None)}
        rows, cols = self.grouped(d_out, d_in)
        per_group = (rows, 1) if self.axis == 0 else (1, cols)
        # two 4-bit values per byte along the first dimension (an odd count leaves half a byte unused)
        return {"qdata": (((rows + 1) // 2, cols), torch.uint8), "qscale": (per_group, None),
                "qshift": (per_group, None)}

    def grouped(self, d_out: int, d_in: int) -> tuple[int, int]:
        """The 2-D layout quanto quantises in: one row per group (axis 0) or one column per group (axis -1)."""
        groups = d_out * d_in // self.group_size
        return (groups, self.group_size) if self.axis == 0 else (self.group_size, groups)


def spec_for(scheme: str | Scheme, d_out: int, d_in: int) -> WeightSpec:
    s = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    if s.group_size is None:
        return WeightSpec(s.bits, 0, None)
    sizes = [size for size in GROUP_FALLBACKS if size <= s.group_size]
    for size in sizes:
        if d_in % size == 0:
            return WeightSpec(s.bits, 0, size)
    for size in sizes:
        if d_out % size == 0:
            return WeightSpec(s.bits, -1, size)
    return WeightSpec(8, 0, None)


def check_scheme(name: str | None) -> None:
    """Refuse an unknown scheme or a missing library before any work is done."""
    if name is None:
        return
    if name not in SCHEMES:
        raise JointRankError(f"unknown quantisation scheme {name!r}: choose from {', '.join(SCHEMES)}")
    _quanto()


def _quanto():
    try:
        import optimum.quanto as quanto
    except ImportError as exc:
        raise JointRankError(f"quantised weights need {LIBRARY}: {INSTALL} ({exc})") from None
    return quanto


def library_version() -> str | None:
    try:
        return importlib.metadata.version(LIBRARY)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# The quantised weight and the modules that hold one


class QuantizedWeight(nn.Module):
    """A (d_out, d_in) weight held as quantised buffers; `tensor()` is optimum-quanto's view of them (no copy),
    which dequantizes inside F.linear."""

    def __init__(self, d_out: int, d_in: int, spec: WeightSpec, device=None, dtype=None):
        super().__init__()
        self.d_out, self.d_in, self.spec = d_out, d_in, spec
        for name, (shape, kind) in spec.shapes(d_out, d_in).items():
            self.register_buffer(name, torch.empty(shape, device=device, dtype=kind or dtype))
        self._view: tuple | None = None  # (key, quanto tensor): rebuilt when a buffer is replaced or moved

    def tensor(self) -> torch.Tensor:
        buffers = [self.qdata, self.qscale] + ([self.qshift] if self.spec.bits == 4 else [])
        key = tuple((b.data_ptr(), b.dtype, b.device) for b in buffers)
        if self._view is None or self._view[0] != key:
            self._view = (key, _quanto_view(self.spec, self.d_out, self.d_in, *buffers))
        return self._view[1]

    def __getstate__(self):  # copy.deepcopy (e.g. heal.teacher_copy): the view is rebuilt, not copied
        state = super().__getstate__().copy()
        state["_view"] = None
        return state

    def dequantized(self) -> torch.Tensor:
        return self.tensor().dequantize()

    @torch.no_grad()
    def set_(self, weight: torch.Tensor, grid: tuple | None = None) -> None:
        """Quantise `weight` into the buffers (scales in the weight's own dtype), on `grid` (scale, zero point) if
        given, else on the one the scheme fits to it."""
        parts = _quantize(weight.detach(), self.spec, grid)
        for name, value in parts.items():
            setattr(self, name, value.to(self.qdata.device) if name != "qdata" else value)
        self._view = None

    def extra_repr(self) -> str:
        g = f", groups of {self.spec.group_size} (axis {self.spec.axis})" if self.spec.group_size else ""
        return f"{self.d_out}x{self.d_in}, {self.spec.bits}-bit{g}"


class QuantizedLinear(nn.Module):
    """A drop-in for nn.Linear (a dense layer or a factor) whose weight is stored quantised."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: WeightSpec, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantized = QuantizedWeight(out_features, in_features, spec, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized.tensor(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _quanto_view(spec: WeightSpec, d_out: int, d_in: int, data, scale, shift=None):
    from optimum.quanto.tensor.packed import PackedTensor
    from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor

    size, stride = str([d_out, d_in]), str([d_in, 1])
    if spec.bits == 8:
        meta = {"qtype": "qint8", "axis": str(spec.axis), "size": size, "stride": stride, "activation_qtype": "none"}
        return WeightQBytesTensor.__tensor_unflatten__({"_data": data, "_scale": scale}, meta, None, None)
    rows, cols = spec.grouped(d_out, d_in)
    packed = PackedTensor.__tensor_unflatten__(
        {"_data": data}, {"bits": "4", "size": str([rows, cols]), "stride": str([cols, 1])}, None, None)
    meta = {"qtype": "qint4", "axis": str(spec.axis), "group_size": str(spec.group_size), "size": size,
            "stride": stride}
    return WeightQBitsTensor.__tensor_unflatten__({"_data": packed, "_scale": scale, "_shift": shift}, meta,
                                                  None, None)


def fit_grid(weight: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero point or None) the scheme stores `weight` with: absmax per channel (8 bits), HQQ per group (4)."""
    quanto = _quanto()
    weight = weight.contiguous()  # a low-rank output factor may be held column-major (LowRankLinear.relayout_)
    if spec.bits == 8:
        return quanto.AbsmaxOptimizer()(weight, quanto.qint8, axis=spec.axis), None
    scale, shift = quanto.HqqOptimizer()(weight, quanto.qint4, axis=spec.axis, group_size=spec.group_size)
    return scale, shift


def _on_grid(weight: torch.Tensor, spec: WeightSpec, grid: tuple):
    """optimum-quanto's quantised tensor of `weight` on a given grid (rounding only, no fitting)."""
    quanto = _quanto()
    weight = weight.contiguous()
    scale, shift = grid
    if spec.bits == 8:
        return quanto.quantize_weight(weight, quanto.qint8, axis=spec.axis, scale=scale, optimized=False)
    return quanto.quantize_weight(weight, quanto.qint4, axis=spec.axis, scale=scale, shift=shift,
                                  group_size=spec.group_size, optimized=False)


def _quantize(weight: torch.Tensor, spec: WeightSpec, grid: tuple | None = None) -> dict[str, torch.Tensor]:
    q = _on_grid(weight, spec, grid if grid is not None else fit_grid(weight, spec))
    if spec.bits == 8:
        return {"qdata": q._data.contiguous(), "qscale": q._scale.contiguous()}
    return {"qdata": q._data._data.contiguous(), "qscale": q._scale.contiguous(), "qshift": q._shift.contiguous()}


# ---------------------------------------------------------------------------------------------------------------
# Applying a scheme to a model, and rebuilding the structure on load


@dataclass
class QuantizationReport:
    scheme: str
    modules: list[str]  # what was quantised (module paths; a shared basis by its own path)
    kept_8bit: list[str]  # int4 modules no group size fits (stored at 8 bits instead)
    seconds: float

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "library": LIBRARY, "library_version": library_version(),
                "modules": len(self.modules), "kept_8bit": self.kept_8bit, "seconds": round(self.seconds, 2),
                "about": SCHEMES[self.scheme].about}


def targets(model: nn.Module) -> list[str]:
    """The modules a scheme applies to: every nn.Linear and shared basis inside the decoder layers."""
    from .architectures import decoder_layers
    from .modules import SharedBasis

    prefix = decoder_layers(model)[0] + "."
    return [name for name, m in model.named_modules()
            if name.startswith(prefix) and (isinstance(m, nn.Linear) or isinstance(m, SharedBasis))]


@torch.no_grad()
def quantize_(model: nn.Module, scheme: str) -> QuantizationReport:
    """Quantise the decoder's linear layers and factors of `model` in place (weight-only, data-free)."""
    import time

    check_scheme(scheme)
    if any(isinstance(m, QuantizedWeight) for m in model.modules()):
        raise JointRankError("this model is already quantised")
    healed_for = getattr(model, "_jointrank_fake_scheme", None)
    if healed_for not in (None, scheme):
        raise JointRankError(f"this model was healed for {healed_for} (fake_quantize_): quantise it with that scheme")
    started = time.perf_counter()
    names = targets(model)
    kept = []
    for name in names:
        module = model.get_submodule(name)
        grid = _take_fake_quantized(module)
        weight = module.weight
        spec = spec_for(scheme, *weight.shape)
        if spec.bits != SCHEMES[scheme].bits:
            kept.append(name)
        _swap(model, name, module, spec, weight, grid)
    _record(model, scheme, names)
    model.__dict__.pop("_jointrank_fake_scheme", None)
    return QuantizationReport(scheme, names, kept, time.perf_counter() - started)


def _swap(model: nn.Module, name: str, module: nn.Module, spec: WeightSpec, weight: torch.Tensor | None,
          grid: tuple | None = None) -> None:
    from .modules import SharedBasis

    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    d_out, d_in = module.weight.shape
    if isinstance(module, SharedBasis):
        module.quantize_as(QuantizedWeight(d_out, d_in, spec, **factory))
        target = module.quantized
    else:
        new = QuantizedLinear(d_in, d_out, module.bias is not None, spec, **factory)
        if module.bias is not None and weight is not None:
            new.bias.copy_(module.bias)
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        target = new.quantized
    if weight is not None:
        target.set_(weight, grid)


def _record(model: nn.Module, scheme: str, names: list[str]) -> None:
    """config.json's quantization_config says which modules hold quantised weights, so a reader can rebuild them:
    added to the jointrank config compress_ attached, or a new one for a model without low-rank units."""
    entry = weights_entry(scheme, names)
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        model.config.quantization_config = {"quant_method": "jointrank", "format_version": 2, "units": [],
                                            "weights": entry}
    elif getattr(q, "quant_method", None) == "jointrank":
        q.weights, q.format_version = entry, 2
    else:
        raise JointRankError(f"this model carries another quantization config ({q!r:.80}); load it in float first")


def weights_entry(scheme: str, names: list[str]) -> dict:
    return {"scheme": scheme, "library": LIBRARY, "format_version": FORMAT_VERSION, "modules": list(names)}


# ---------------------------------------------------------------------------------------------------------------
# Quantisation-aware healing: train the factors as they will be stored


class FakeQuantized(nn.Module):
    """A parametrization (torch.nn.utils.parametrize) of a weight as the scheme will store it.

    The forward rounds the float weight to the scheme's grid, fixed when the parametrization was registered (the
    scale and zero point the scheme fits to the weight then), and dequantizes it: the model computes what the
    quantised checkpoint will. The gradient passes straight through the rounding to the float weight (the
    straight-through estimator), so distillation moves the weights to where their *rounded* values serve the
    teacher best. quantize_ then stores each weight on the same grid, so the saved model computes exactly what
    was trained."""

    def __init__(self, spec: WeightSpec, scale: torch.Tensor, shift: torch.Tensor | None):
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", scale.detach(), persistent=False)
        self.register_buffer("shift", None if shift is None else shift.detach(), persistent=False)
        self._frozen: tuple | None = None  # (key, rounded weight) for a weight that is not being trained

    def rounded(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _on_grid(weight.detach(), self.spec, (self.scale, self.shift)).dequantize().to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not weight.requires_grad:  # a frozen weight (a dense layer left, or outside training): round it once
            key = (weight.data_ptr(), weight._version)
            if self._frozen is None or self._frozen[0] != key:
                self._frozen = (key, self.rounded(weight))
            return self._frozen[1]
        self._frozen = None
        return weight + (self.rounded(weight) - weight).detach()


@torch.no_grad()
def fake_quantize_(model: nn.Module, scheme: str) -> list[str]:
    """Make every weight quantize_ would store compute as stored (FakeQuantized), on the grid the scheme fits to
    it now; the float weights stay trainable. Returns the module paths. quantize_ later stores them on these grids
    and removes the parametrizations."""
    from torch.nn.utils import parametrize

    check_scheme(scheme)
    if is_quantized(model) or getattr(model, "_jointrank_fake_scheme", None) is not None:
        raise JointRankError("this model is already quantised")
    names = targets(model)
    for name in names:
        module = model.get_submodule(name)
        spec = spec_for(scheme, *module.weight.shape)
        scale, shift = fit_grid(module.weight.detach(), spec)
        parametrize.register_parametrization(module, "weight", FakeQuantized(spec, scale, shift))
    model._jointrank_fake_scheme = scheme
    return names


def _take_fake_quantized(module: nn.Module) -> tuple | None:
    """The grid fake_quantize_ fixed for `module`'s weight (None if it has none); the parametrization is removed,
    leaving the trained float weight. (quantize_ has checked the model was healed for its scheme.)"""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, "weight"):
        return None
    fake = module.parametrizations.weight[0]
    if not isinstance(fake, FakeQuantized):
        raise JointRankError(f"{type(module).__name__}.weight carries a parametrization jointrank did not add")
    grid = (fake.scale, fake.shift)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return grid


def install_quantized(model: nn.Module, weights: dict | None) -> None:
    """Rebuild quantised modules (weights uninitialised) from config.json's `weights` entry, on a skeleton whose
    low-rank units are already installed. A malformed entry or a missing library is one clear error."""
    if not weights:
        return
    fix = "the checkpoint is damaged or was edited; regenerate it"
    if not isinstance(weights, dict) or weights.get("scheme") not in SCHEMES:
        raise JointRankError(f"config.json's quantization_config has an unknown weight scheme "
                             f"({weights.get('scheme') if isinstance(weights, dict) else weights!r}); {fix}")
    if weights.get("format_version") != FORMAT_VERSION:
        raise JointRankError(f"quantised weights of format {weights.get('format_version')} are not supported by "
                             "this jointrank version")
    _quanto_for_load(weights["scheme"])
    names = weights.get("modules")
    if not isinstance(names, list):
        raise JointRankError(f"config.json's quantization_config lists no quantised modules; {fix}")
    for name in names:
        try:
            module = model.get_submodule(name)
            d_out, d_in = module.weight.shape
        except (AttributeError, TypeError, ValueError) as exc:
            raise JointRankError(f"config.json names quantised module {name!r}, which this model does not have; "
                                 f"{fix}") from exc
        _swap(model, name, module, spec_for(weights["scheme"], d_out, d_in), None)


def _quanto_for_load(scheme: str) -> None:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        raise JointRankError(f"this checkpoint stores {scheme} weights, which need {LIBRARY} to load: "
                             f"{INSTALL}") from None


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float copy of a quantised model, each quantised weight replaced by its dequantization: the same function,
    computed without dequantizing inside every matmul (for evaluation, and as the tests' reference)."""
    import copy

    from .modules import SharedBasis

    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(module.quantized.dequantized())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, attr = name.rsplit(".", 1)
            setattr(ref.get_submodule(parent), attr, dense)
        elif isinstance(module, SharedBasis) and "quantized" in module._modules:
            weight = module.quantized.dequantized().detach().clone()
            del module._modules["quantized"]
            module.weight = nn.Parameter(weight)
    return ref


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedWeight) for m in model.modules())
