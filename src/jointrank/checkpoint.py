"""Save and load compressed checkpoints: safetensors + config.json + tokenizer + a manifest. No pickle.

A checkpoint is written into a hidden staging directory beside the target and renamed into place only when
complete, the manifest last: an interrupted run leaves `.NAME.tmp-*`, never a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .errors import JointRankError
from .sources import MANIFEST_NAME

MANIFEST_FORMAT = 1


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done, unless asked to overwrite it."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise JointRankError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise JointRankError(f"{out} exists and is not a directory")
    return out


def save(model, tokenizer, out: str | Path, manifest: dict, *, overwrite: bool = False) -> Path:
    """Write model (compressed or dense), tokenizer and manifest atomically into `out`."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / MANIFEST_NAME).write_text(json.dumps(with_checksums(stamped(manifest), staging), indent=2) + "\n")
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def manifest_for(result, *, source: str, config, dense: bool = False, evals: dict | None = None) -> dict:
    """What a checkpoint's manifest says about how it was made (the in-memory and streaming paths share it)."""
    energies = [u.energy_kept for u in result.units]
    return {
        "source": source,
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


def _swap_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        graveyard = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, graveyard)
        os.replace(staging, out)
        shutil.rmtree(graveyard, ignore_errors=True)
    else:
        os.replace(staging, out)


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

    from . import __version__

    return {"jointrank": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
