"""One evaluation run: the tasks scored on one model, and the results document that records how (schema
report.SCHEMA: settings, versions, machine, the model's compression manifest, per-task results)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from ..checkpoint import read_manifest
from ..format import MANIFEST_NAME
from .data import check_data, resolve_data_dir
from .report import SCHEMA
from .tasks import PERPLEXITY_TASKS, ZEROSHOT_TASKS, parse_tasks


def manifest_if_any(model_dir: str | None) -> dict | None:
    """The compression manifest of the evaluated model's directory; None for a dense model or a hub id (an
    evaluation records what it ran on, it does not require a checkpoint). A damaged manifest is an error."""
    if not model_dir or not (Path(model_dir) / MANIFEST_NAME).is_file():
        return None
    return read_manifest(model_dir)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("jointrank", "torch", "transformers", "lm_eval", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def evaluate(
    model,
    tokenizer,
    tasks: list[str] | str,
    *,
    data_dir=None,
    limit: int | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 8,
    ppl_batch_size: int = 1,
    window_bos: bool = False,
    seed: int = 1234,
    progress: bool = True,
    model_spec: str | None = None,
    model_dir: str | None = None,
    command: str | None = None,
    on_progress=None,
) -> dict:
    """Evaluate MODEL on TASKS; returns the results dict (schema jointrank.eval/1, as written by ``eval --out``).

    data_dir: flag value (None falls back to $JOINTRANK_DATA, then the hub when online). limit: seeded sample of
    documents per zero-shot task. seqlen / max_windows: perplexity windows; window_bos: each started with the
    tokenizer's BOS (jointrank.evaluate.perplexity explains why that matters on Gemma). model_dir: where to look for a
    compression manifest. on_progress(partial_results) is called after each task with the results so far
    (``complete`` False until the end), so a long run can be saved as it goes. The model is evaluated as given
    (its dtype and device).
    """

    from .perplexity import load_text, perplexity
    from .zeroshot import run_tasks

    tasks = parse_tasks(tasks)
    root = resolve_data_dir(data_dir)
    started_utc = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_start, t0 = _load_avg(), time.perf_counter()
    check_data(tasks, root)  # fail on missing data before any model time is spent
    results: dict = {}

    def document(complete: bool) -> dict:
        return _document(model, tasks, results, complete, model_spec=model_spec, model_dir=model_dir, command=command,
                         limit=limit, seed=seed, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                         ppl_batch_size=ppl_batch_size, window_bos=window_bos, root=root, started_utc=started_utc, load_start=load_start,
                         wall=time.perf_counter() - t0)

    def done(task: str, entry: dict) -> None:
        results[task] = entry
        if on_progress is not None:
            on_progress(document(complete=False))

    for task in tasks:
        if task in PERPLEXITY_TASKS:
            text = load_text(task, root)
            entry = perplexity(model, tokenizer, text, seqlen=seqlen, max_windows=max_windows,
                               batch_size=ppl_batch_size, progress=progress, desc=task, window_bos=window_bos)
            done(task, {**entry, "source": f"local:{root}" if root else "hub"})
    zs = [t for t in tasks if t in ZEROSHOT_TASKS]
    if zs:
        run_tasks(model, tokenizer, zs, data_dir=root, limit=limit, seed=seed, batch_size=batch_size,
                  progress=progress, on_task_done=done)
    return document(complete=True)


def _document(model, tasks, results, complete, *, model_spec, model_dir, command, limit, seed, seqlen, max_windows,
              batch_size, ppl_batch_size, window_bos, root, started_utc, load_start, wall) -> dict:
    import torch

    from .zeroshot import BOOTSTRAP_ITERS

    params = sum(p.numel() for p in model.parameters())
    return {
        "schema": SCHEMA,
        "model": {"spec": model_spec or type(model).__name__, "class": type(model).__name__, "parameters": params,
                  "dir": model_dir},
        "manifest": manifest_if_any(model_dir),
        "command": command or shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "settings": {"tasks": tasks, "limit": limit, "seed": seed, "seqlen": seqlen, "max_windows": max_windows,
                     "window_bos": window_bos,
                     "batch_size": batch_size, "ppl_batch_size": ppl_batch_size, "bootstrap_iters": BOOTSTRAP_ITERS,
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "data_source": f"local:{root}" if root else "hub"},
        "versions": _versions(),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_avg_start": load_start, "load_avg_end": _load_avg()},
        "started_utc": started_utc,
        "wall_time_s": wall,
        "complete": complete,
        "pending": [t for t in tasks if t not in results],
        "results": {t: results[t] for t in tasks if t in results},
    }
