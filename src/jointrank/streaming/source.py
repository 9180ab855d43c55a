"""A safetensors checkpoint read without building the model: tensor names, shapes and files from the headers,
tensors on demand (memory-mapped, one read at a time), and the model's group layout from config.json and shapes."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..architectures import ARCHITECTURES, Member, ModelLayout, group_layouts
from ..errors import JointRankError
from ..format import INDEX_NAME, SINGLE_NAME, counts_as_parameter


@dataclass
class TensorSource:
    """The tensors of a (sharded) safetensors checkpoint: name -> file, shape and dtype from the headers."""

    root: Path
    files: dict[str, str]  # tensor name -> file name
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    config: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "TensorSource":
        from ..verify import read_json, stored_tensors

        root = Path(path)
        if not (root / "config.json").is_file():
            raise JointRankError(f"{root} has no config.json: streaming needs a Hugging Face safetensors directory")
        if not (root / INDEX_NAME).is_file() and not (root / SINGLE_NAME).is_file():
            raise JointRankError(f"{root} has no {SINGLE_NAME} or {INDEX_NAME}: streaming reads safetensors only")
        config = read_json(root / "config.json", "config.json is damaged; re-copy the model")
        stored = stored_tensors(root)  # headers only; truncated files, a missing shard, a bad index: one error
        files = {k: t.file.name for k, t in stored.items()}
        shapes = {k: t.shape for k, t in stored.items()}
        dtypes = {k: t.dtype for k, t in stored.items()}
        return cls(root, files, shapes, dtypes, config)

    def check_finite(self) -> None:
        """Refuse NaN/Inf anywhere in the source before any work (one tensor in memory at a time)."""
        from safetensors import safe_open

        from ..finite import check_weights

        for file in sorted(set(self.files.values())):
            with safe_open(str(self.root / file), "pt") as f:
                check_weights(((k, f.get_tensor(k)) for k in f.keys()), where=str(self.root / file))

    def fingerprint(self) -> dict:
        return {name: [os.stat(self.root / name).st_size, os.stat(self.root / name).st_mtime_ns]
                for name in sorted(set(self.files.values()))}

    def names(self) -> list[str]:
        return list(self.shapes)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors. Files are mapped only while reading, so pages read for one layer are not
        still counted in this process's resident memory while the next one is processed."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.root / file), "pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k).clone()
        return out


def read_layout(source: TensorSource) -> ModelLayout:
    """The ModelLayout `describe(model)` would give, from config.json and tensor shapes alone."""
    config = source.config
    model_type = config.get("model_type")
    table = ARCHITECTURES.get(model_type)
    if table is None:
        raise JointRankError(f"unsupported architecture {model_type!r} for streaming; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    first_parent, first_member = next(iter(table.values()))[0], next(iter(table.values()))[1][0]
    pattern = re.compile(rf"^(.*)\.(\d+)\.{re.escape(first_parent)}\.{re.escape(first_member)}\.weight$")
    found = [pattern.match(n) for n in source.shapes]
    prefixes = {m.group(1) for m in found if m}
    if len(prefixes) != 1:
        raise JointRankError(f"cannot find the decoder layers of this {model_type} checkpoint "
                             f"(layer prefixes found: {sorted(prefixes) or 'none'})")
    layers_path = prefixes.pop()
    num_layers = 1 + max(int(m.group(2)) for m in found if m)
    expected = config.get("num_hidden_layers", num_layers)
    if expected != num_layers:
        raise JointRankError(f"config.json says {expected} layers, the checkpoint holds {num_layers}")
    def member(index: int, parent_name: str, name: str) -> Member | None:
        full = f"{layers_path}.{index}.{parent_name}.{name}"
        shape = source.shapes.get(f"{full}.weight")
        if shape is None or len(shape) != 2:
            return None
        return Member(full, shape[0], shape[1], f"{full}.bias" in source.shapes)

    groups = group_layouts(model_type, layers_path, num_layers, member)
    params = _parameter_names(source)
    decoder = [n for n in params if n.startswith(layers_path + ".")]
    return ModelLayout(model_type=model_type, num_layers=num_layers, groups=groups,
                       params_total=sum(numel(source.shapes[n]) for n in params),
                       params_decoder=sum(numel(source.shapes[n]) for n in decoder), layers_path=layers_path)


def _parameter_names(source: TensorSource) -> list[str]:
    """Stored tensors that are parameters, each counted once (a tied lm_head stored anyway is the embedding)."""
    tied = source.config.get("tie_word_embeddings", False)
    return [n for n in source.shapes if counts_as_parameter(n, tied)]


def numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def is_streamable_source(path: str | Path) -> bool:
    """A local Hugging Face directory holding safetensors weights (what streaming can read)."""
    root = Path(path)
    with contextlib.suppress(OSError):
        return (root / "config.json").is_file() and ((root / INDEX_NAME).is_file() or (root / SINGLE_NAME).is_file())
    return False
