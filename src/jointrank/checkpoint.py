"""Save and load compressed checkpoints: safetensors + config.json + tokenizer + a manifest. No pickle.

A checkpoint is written into a hidden staging directory beside the target and renamed into place only when
complete, the manifest last: an interrupted run leaves `.NAME.tmp-*`, never a directory that looks finished.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import torch

from . import zoo
from .errors import JointRankError
from .format import MANIFEST_FORMAT, MANIFEST_NAME
from .outputs import swap_into_place


def check_output(out: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Refuse an existing output (unless overwrite), one overlapping the source or an unwritable one, before any
    work is done; clean up what dead runs left beside it (see outputs.py)."""
    from .outputs import check_output as check

    return check(out, overwrite, source)


def save(model, tokenizer, out: str | Path, result, *, source: str | None = None, config=None,
         evals: dict | None = None, overwrite: bool = False) -> Path:
    """Write model (compressed, or merged back to dense), tokenizer and its manifest atomically into `out`.

    The manifest is built here from `result` (what compress_ returned; healing reports go in result.extra),
    `source` (what was compressed), `config` (default: the plan's) and `evals`, so every checkpoint saved from
    Python is one `jointrank info` reads and `jointrank.load` verifies."""
    from .modules import LowRankLinear
    from .plan import JointRankConfig

    if isinstance(result, dict):
        raise JointRankError("save builds the manifest itself: pass the CompressionResult compress_ returned, e.g. "
                             "jointrank.save(model, tokenizer, out, result, source='my-model')")
    if not hasattr(result, "plan") or not hasattr(result, "units"):
        raise JointRankError(f"save needs the CompressionResult compress_ returned, not {type(result).__name__}")
    if not source:
        raise JointRankError("save needs source=: what was compressed (a path, hub id or alias), for the manifest")
    config = config if config is not None else JointRankConfig.from_dict(result.plan.config)
    dense = not any(isinstance(m, LowRankLinear) for m in model.modules())  # merged back with merge_
    manifest = manifest_for(result, source=source, config=config, dense=dense, evals=evals)
    return write_checkpoint(model, tokenizer, out, manifest, overwrite=overwrite)


def write_checkpoint(model, tokenizer, out: str | Path, manifest: dict, *, overwrite: bool = False) -> Path:
    """The atomic write under save, for a manifest already built (manifest_for): staging directory, weights,
    tokenizer, the manifest with checksums last, then renamed into place."""
    from .outputs import staging_dir

    out = check_output(out, overwrite)
    staging = staging_dir(out)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / MANIFEST_NAME).write_text(json.dumps(with_checksums(stamped(manifest), staging), indent=2) + "\n")
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def manifest_for(result, *, source: str, config, dense: bool = False, evals: dict | None = None) -> dict:
    """What a checkpoint's manifest says about how it was made (the in-memory and streaming paths share it)."""
    energies = [u.energy_kept for u in result.units]
    model = zoo.lookup(source)
    origin = {"source_record": zoo.source_record(model)} if model is not None else {}  # licence, packages, sha256
    return {
        "source": source,
        **origin,
        "format_kind": "dense" if dense else "factorised",
        "config": config.to_dict(),
        "plan": result.plan.to_dict(),
        "result": result.to_dict(),
        "summary": {
            "units_factorised": len(result.units),
            "min_energy_kept": min(energies) if energies else None,
            "params_total_ratio": result.params_total_after / result.params_total_before,
            "params_decoder_ratio": result.params_decoder_after / result.params_decoder_before,
        },
        "evaluation": evals or {},
    }


def stamped(manifest: dict) -> dict:
    """The manifest as written: format version, creation time and library versions first."""
    return {"format": MANIFEST_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(), **manifest}


def with_checksums(manifest: dict, staging: Path) -> dict:
    """The manifest plus the sha256 of every tensor as written (`jointrank info --verify` checks them)."""
    from .verify import tensor_checksums

    return {**manifest, "checksums": tensor_checksums(staging)}


def load(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         verify_checksums: bool = False):
    """Load a jointrank checkpoint (compressed or dense export) as a transformers model.

    The checkpoint is verified first (verify.verify_checkpoint): its tensors must be exactly what config.json and
    the manifest imply; with verify_checksums, every tensor's bytes must match the manifest's checksums too.
    """
    from transformers import AutoModelForCausalLM

    from .verify import verify_checkpoint

    path = Path(path)  # importing this package registered the "jointrank" quantizer with transformers
    if not (path / MANIFEST_NAME).is_file():
        raise JointRankError(f"{path} is not a jointrank checkpoint (no {MANIFEST_NAME})")
    verify_checkpoint(path, checksums=verify_checksums)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    return model.to(device).eval()


def read_manifest(path: str | Path) -> dict:
    from .verify import read_manifest as read

    return read(path)  # one clear error for a missing, empty or garbage manifest


def versions() -> dict:
    import transformers

    from .version import __version__

    return {"jointrank": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
