"""The checkpoint format in one place: file names, the manifest's version, and the names of every tensor a unit
stores. Every writer (in-memory save, streaming, Ray) and every reader (load, verify, info, evaluate, sources and the
transformers quantizer) takes them from here, so they cannot drift apart.

Tensor names of one unit (a plan entry that is factorised), for a member module `<m>` and its parent `<p>`:

  separate:  <m>.basis.weight (k, d_in)   <m>.out.weight (d_out, k)   [<m>.out.bias, the original bias, exact]
  joint:     <p>.<group>_basis.weight (k, d_in), stored once for the group, and per member <m>.out.weight [+ bias]

A cross-layer unit (JointRankConfig.share_layers) is a joint unit whose members sit in several layers: its basis is
stored once, under the first member's parent, and every member of every layer stores its own output factor.

`quantization_units(plan)` is what config.json's quantization_config carries so that a reader can rebuild the
module structure before loading these tensors (modules.install_unit builds exactly these names).
"""

from __future__ import annotations

MANIFEST_NAME = "jointrank_manifest.json"  # written last: a directory without it is not a finished checkpoint
MANIFEST_FORMAT = 1  # the manifest layout's version, stamped into every manifest
INDEX_NAME = "model.safetensors.index.json"  # transformers' names for sharded and single-file weights
SINGLE_NAME = "model.safetensors"
# Buffers some (old) checkpoints store next to the weights: not parameters, never counted, never required.
BUFFER_SUFFIXES = (".inv_freq", ".masked_bias", ".attn.bias")


def basis_name(parent: str, group: str) -> str:
    """The module path of a joint group's shared basis, registered on the members' parent."""
    return f"{parent}.{group}_basis"


def is_shared(entry) -> bool:
    """A joint unit's members share one stored basis; a separate unit's member has its own."""
    return entry.structure == "joint"


def structure_of(record: dict) -> str:
    """keep | separate | joint of a stored plan entry, group rule or unit record. Manifests written before
    jointrank 0.x called it "method", the word that now only names the decomposition (svd, svd_llm, ...)."""
    return record["structure"] if "structure" in record else record["method"]


def unit_tensors(entry, factors, biases: dict, *, dtype, device="cpu") -> dict:
    """The tensors one factorised unit stores, by checkpoint name: factors cast to `dtype` on `device` (fresh
    copies), biases (`{member: tensor}`, the original ones, kept exact) as given."""

    def cast(t):
        return t.to(device=device, dtype=dtype, copy=True)

    out = {}
    for i, member in enumerate(entry.members):
        out[f"{member}.out.weight"] = cast(factors.outs[i])
        if member in biases:
            out[f"{member}.out.bias"] = biases[member]
        if not is_shared(entry):
            out[f"{member}.basis.weight"] = cast(factors.basis)
        elif i == 0:
            parent = member.rsplit(".", 1)[0]
            out[f"{basis_name(parent, entry.group)}.weight"] = cast(factors.basis)
    return out


def quantization_units(plan) -> list[dict]:
    """The module structure a checkpoint needs to be rebuilt: what goes into config.json's quantization_config."""
    return [{"group": e.group, "members": list(e.members), "rank": e.rank, "shared": is_shared(e)}
            for e in plan.factorised]


def counts_as_parameter(name: str, tied_embeddings: bool) -> bool:
    """A stored tensor that is a parameter, counted once: not a buffer, not the tied copy of the embedding."""
    return not name.endswith(BUFFER_SUFFIXES) and not (tied_embeddings and name == "lm_head.weight")


# What `jointrank info` groups stored bytes by. A quantised module stores <m>.quantized.{qdata,qscale,qshift}
# (quantize.py) where a float one stores <m>.weight: both count under the module's kind.
TENSOR_KINDS = ("low-rank factors", "dense linear layers", "embeddings and output head", "norms, biases, other")
_QUANTIZED_PARTS = (".quantized.qdata", ".quantized.qscale", ".quantized.qshift")


def tensor_kind(name: str, shape: tuple[int, ...]) -> str:
    module = name
    for part in _QUANTIZED_PARTS + (".weight", ".bias"):
        if name.endswith(part):
            module = name[: -len(part)]
            break
    quantized = name.endswith(_QUANTIZED_PARTS)
    if module.endswith((".basis", ".out", "_basis")):
        return "low-rank factors"
    if "embed" in module or module.startswith("lm_head") or module.endswith(".lm_head"):
        return "embeddings and output head"
    if quantized or (len(shape) == 2 and name.endswith(".weight")):
        return "dense linear layers"
    return "norms, biases, other"
