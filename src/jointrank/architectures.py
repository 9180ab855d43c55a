"""Which linear layers of a decoder layer read the same input, per model family: one table, one place.

A *group* is a set of nn.Linear modules of one decoder layer that read the same input tensor. Q and K read the
normalised hidden state, so do gate and up; V reads it too but is never joined with Q/K, because Q and K only meet
inside softmax(QKᵀ) while V's output space is mixed by it (the paper keeps V and O separate for that reason).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import JointRankError

# group name -> (parent module relative to the decoder layer, member attribute names)
LLAMA_STYLE_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qk": ("self_attn", ("q_proj", "k_proj")),
    "v": ("self_attn", ("v_proj",)),
    "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}
GROUP_NAMES = tuple(LLAMA_STYLE_GROUPS)
JOINABLE = ("qk", "gate_up")

# model_type -> group table. Llama-style naming covers these families; quirks (GQA, q/k/v biases, q/k norms,
# tied embeddings) need nothing special because norms act after the projections and biases are kept exact.
ARCHITECTURES: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    name: LLAMA_STYLE_GROUPS
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
}


@dataclass(frozen=True)
class Member:
    name: str  # full module path in the model, e.g. "model.layers.3.self_attn.q_proj"
    d_out: int
    d_in: int
    bias: bool


@dataclass(frozen=True)
class GroupLayout:
    layer: int
    group: str
    parent: str  # full path of the module that owns the members (where a shared basis is registered)
    members: tuple[Member, ...]

    @property
    def d_in(self) -> int:
        return self.members[0].d_in


@dataclass(frozen=True)
class ModelLayout:
    """What a plan needs to know about a model: shapes only, no weights."""

    model_type: str
    num_layers: int
    groups: tuple[GroupLayout, ...]
    params_total: int  # unique stored parameters of the whole model
    params_decoder: int  # of the decoder layers alone
    layers_path: str = "model.layers"
    extra: dict = field(default_factory=dict)

    def group_of(self) -> dict[str, GroupLayout]:
        """{member module name: the group (and so the layer and the input) it belongs to}."""
        return {m.name: g for g in self.groups for m in g.members}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return path, module
    raise JointRankError(f"{type(model).__name__}: no decoder layer list found (looked for model.layers and the like)")


def describe(model: nn.Module) -> ModelLayout:
    """Read a model's group layout and parameter counts; one clear error if its family is not supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    layers_path, layers = decoder_layers(model)
    table = ARCHITECTURES.get(model_type)
    if table is None:
        found = [f"{n} ({type(m).__name__})" for n, m in layers[0].named_modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
        raise JointRankError(
            f"unsupported architecture {model_type!r}: layer 0 ({type(layers[0]).__name__}) has weight matrices "
            f"{', '.join(found) or 'none'}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    def member(index: int, parent_name: str, name: str) -> Member | None:
        module = getattr(layers[index].get_submodule(parent_name), name, None)
        return None if module is None else _member(f"{layers_path}.{index}.{parent_name}.{name}", module)

    groups = group_layouts(model_type, layers_path, len(layers), member)
    return ModelLayout(
        model_type=model_type,
        num_layers=len(layers),
        groups=groups,
        params_total=count_parameters(model),
        params_decoder=count_parameters(layers),
        layers_path=layers_path,
    )


def group_layouts(model_type: str, layers_path: str, num_layers: int, member) -> tuple[GroupLayout, ...]:
    """Every group of every decoder layer, from the family's table. `member(layer, parent, name)` gives the Member
    found there (from a module, or from a checkpoint's tensor shapes when streaming) or None if it is missing."""
    table = ARCHITECTURES[model_type]
    groups = []
    for index in range(num_layers):
        for group, (parent_name, names) in table.items():
            members = []
            for name in names:
                found = member(index, parent_name, name)
                if found is None:
                    raise JointRankError(f"{model_type} layer {index}: {parent_name}.{name} is missing or not a "
                                         "matrix")
                members.append(found)
            if len({m.d_in for m in members}) != 1:
                raise JointRankError(f"{model_type} layer {index}: members of {group} read inputs of different sizes")
            groups.append(GroupLayout(index, group, f"{layers_path}.{index}.{parent_name}", tuple(members)))
    return tuple(groups)


def _member(name: str, module: nn.Module) -> Member:
    from .modules import LowRankLinear  # a model compressed before is described by its original shapes

    if isinstance(module, (nn.Linear, LowRankLinear)):
        return Member(name, module.out_features, module.in_features, module.bias is not None)
    raise JointRankError(f"{name} is a {type(module).__name__}, not a linear layer")


def count_parameters(module: nn.Module) -> int:
    """Unique stored parameter elements: a tied or shared tensor is counted once, as it is stored once."""
    seen, total = set(), 0
    for _, p in module.named_parameters(remove_duplicate=False):
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape)) if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def cache_keyword(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache under, and its output returns it as: transformers 5.x renamed
    past_key_values to cache; older releases (and models written against them) still use past_key_values."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
