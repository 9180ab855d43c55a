"""Checks of a command's inputs that can be made before any expensive work: seconds, not the minutes a model load
and a compression take, and nothing written. Each failure is one JointRankError naming the problem and the fix.

`check_compress(...)` runs at the start of `jointrank compress` (pipeline.compress_model); the pieces serve the other
commands too.
"""

from __future__ import annotations

import codecs
import importlib.util
from pathlib import Path

from .errors import JointRankError

TEXT_SAMPLE = 1 << 16  # bytes of a calibration file looked at to decide it is text


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise JointRankError(f"--workers must be at least 1 (got {workers})")


def check_compress(source: str, out, *, overwrite: bool = False, device: str | None = None,
                   eval_tasks: str | None = None, data_dir: str | None = None, calibration: str | None = None,
                   streaming: bool = False):
    """Everything about a compression request that does not need the model loaded (pipeline.compress_model runs
    it first, so the command and a Python caller are refused alike); returns the resolved source."""
    from .methods.selfgen import parse_spec
    from .outputs import check_output

    check_device(device)
    if eval_tasks and not streaming:  # streaming refuses --eval and --calibration itself, with its own reason
        check_eval(eval_tasks, data_dir)
    if calibration and not streaming and parse_spec(calibration) is None:  # 'self' is sampled, not read
        check_text_file(calibration, "--calibration")
    resolved = check_source(source)
    if resolved.kind == "jointrank_dir":
        raise JointRankError(f"{source} is already a jointrank checkpoint; compress the original model instead "
                             "(its manifest names it as source)")
    check_output(out, overwrite, source=None if resolved.kind == "hub" else resolved.path)
    return resolved


def check_device(device: str | None) -> None:
    if not device:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise JointRankError(f"--device {device}: not a device name; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise JointRankError(f"--device {device}: CUDA is not available on this machine; drop --device or use "
                                 "cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise JointRankError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise JointRankError(f"--device {device}: MPS is not available on this machine; drop --device or use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise JointRankError(f"--device {device}: jointrank runs on cpu, cuda or mps")


def check_eval(spec: str, data_dir: str | None) -> list[str]:
    """Task names known, their extra (lm-eval for zero-shot) installed, their data found."""
    try:
        from .evaluate import ZEROSHOT_TASKS, check_data, data, parse_tasks
    except ImportError as exc:
        raise JointRankError(f"--eval needs the eval extra: pip install 'jointrank[eval]' ({exc})") from None
    tasks = parse_tasks(spec)
    zeroshot = [t for t in tasks if t in ZEROSHOT_TASKS]
    if zeroshot and importlib.util.find_spec("lm_eval") is None:
        raise JointRankError(f"zero-shot task {zeroshot[0]} needs lm-eval: pip install 'jointrank[eval]' (or "
                             "evaluate perplexity only, e.g. --eval wikitext2)")
    check_data(tasks, data.resolve_data_dir(data_dir))
    return tasks


def check_text_file(path: str, flag: str) -> None:
    """A calibration file must be non-empty UTF-8 text (a binary file tokenises into noise without complaint)."""
    file = Path(path)
    if not file.is_file():
        raise JointRankError(f"{flag} {path}: no such file")
    with open(file, "rb") as f:
        sample = f.read(TEXT_SAMPLE)
    if not sample.strip():
        raise JointRankError(f"{flag} {path} is empty; give a text file, one document per line")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=len(sample) < TEXT_SAMPLE)
    except UnicodeDecodeError:
        raise JointRankError(f"{flag} {path} is not UTF-8 text (binary data?); give a text file, one document "
                             "per line") from None
    if b"\x00" in sample:
        raise JointRankError(f"{flag} {path} contains NUL bytes: binary data, not text; give a text file")


def check_source(spec: str):
    """Resolve MODEL and check what can be checked cheaply: config.json, model type, weight file headers."""
    from .sources import check_source_files, resolve

    source = resolve(spec)
    check_source_files(source)
    return source


def check_json_out(path: str, flag: str, *, parent_must_exist: bool = True) -> None:
    """A file to write: not a directory, in an existing directory (or, if not required, a creatable one)."""
    from .outputs import check_writable

    file = Path(path)
    if file.is_dir():
        raise JointRankError(f"{flag} {path} is a directory; give a file name")
    parent = file.parent if str(file.parent) else Path(".")
    if parent_must_exist and not parent.is_dir():
        raise JointRankError(f"{flag} {path}: directory {parent} does not exist; create it first")
    check_writable(file)
