"""Zero-shot accuracy through lm-evaluation-harness, reading local data files.

Each local task is a YAML generated at run time that ``include``s lm-eval's own built-in task YAML (found in the
installed package) and overrides only where the documents come from: ``dataset_path: json`` with
``dataset_kwargs.data_files`` pointing at a JSONL that ``data.py`` rebuilt, in the built-in's HF schema, from the data
dir. Prompts, target/choice functions, ``process_docs`` and metrics are therefore the built-in task's, not copies of
them. Nothing is written into the repo: the JSONL and YAML live in a temporary directory for the run.

``--limit N`` picks N document indices with a seeded RNG (the same documents on every run, independent per task)
and hands them to lm-eval's ``samples=``; the indices are returned so the results file can record them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

from ..errors import JointRankError
from . import data as data_mod
from .tasks import TASKS, ZEROSHOT_TASKS

LOCAL_PREFIX = "jointrank_"
# Only bootstrapped stderrs use this (lambada perplexity); acc stderrs are analytic. 100k (the default) costs minutes.
BOOTSTRAP_ITERS = 1000


def builtin_yaml(task: str) -> Path:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / TASKS[task].builtin
    if not path.is_file():
        raise JointRankError(f"lm-eval {_lm_eval_version()} has no built-in task file {TASKS[task].builtin} for {task}")
    return path


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def sample_indices(task: str, n_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """Seeded, sorted sample of LIMIT document indices (None = all). Same seed, same documents, every run.

    The sample is a prefix of one seeded permutation of the task's documents, so samples are nested: the 100
    documents of `--limit 100` are among the 1000 of `--limit 1000` (random.sample is not nested across sizes)."""
    if limit is None or limit >= n_docs:
        return None
    if limit < 1:
        raise JointRankError(f"--limit must be positive, got {limit}")
    order = list(range(n_docs))
    # A string seed is hashed with SHA-512 by random.Random, so this is stable across processes and Python runs.
    random.Random(f"{seed}:{task}").shuffle(order)
    return sorted(order[:limit])


def write_local_task(task: str, docs: list[dict], out_dir: Path) -> str:
    """Write DOCS as JSONL plus a YAML that includes the built-in task; returns the local task name."""
    split = TASKS[task].split
    data_file = out_dir / f"{task}.jsonl"
    with open(data_file, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    name = LOCAL_PREFIX + task
    config = {
        "include": str(builtin_yaml(task)),
        "task": name,
        "tag": [],  # do not join the built-in's tag groups (e.g. ai2_arc)
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }
    # JSON is valid YAML; lm-eval's loader reads it with its !function-aware YAML loader.
    (out_dir / f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return name


@contextlib.contextmanager
def local_tasks(tasks: list[str], data_dir: Path):
    """Temporary task dir holding our local tasks; yields (TaskManager, {task: (local name, n_docs)})."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="jointrank-tasks-") as tmp:
        names = {}
        for task in tasks:
            docs = data_mod.load_docs(task, data_dir)
            names[task] = (write_local_task(task, docs, Path(tmp)), len(docs))
        yield TaskManager(include_path=tmp), names


def _continuation_only_hflm():
    """HFLM that projects to the vocabulary only where a continuation can be scored.

    HFLM computes [batch, positions, vocab] logits for every input position and keeps only the continuation's.
    With Gemma's 262k vocabulary that projection costs more than the whole decoder. lm-eval slices each row with
    ``ctx_len = inplen + (logits.shape[1] - padding_len)``, i.e. it accepts logits that cover only the *last*
    positions of the padded batch; so we return logits from position ``start`` on, where ``start`` is a safe lower
    bound on every row's first scored position: (shortest row length) - (longest continuation of the task).
    Rows are right-padded with zeros, so counting trailing zeros can only under-estimate a row's length, which only
    makes ``start`` smaller (safe). Scores are identical to HFLM's (tested on a tiny model).

    A batch also holds every row from ``start`` on, so rows of very different lengths cost logits for the longest
    row's whole tail: on BoolQ (250 documents, Gemma-3-270M) one batch of 8 spanned 304 to 1253 tokens, 7.4 GiB of
    float32 logits and as much again for lm-eval's log-softmax (a 16 GiB peak). So batches are cut (through lm-eval's
    own batch scheduler) where the next row would take the batch's logits past ``logits_budget`` bytes, and hold at
    most ``batch_size`` rows as asked. Batching changes which rows share a forward, not a score.
    """
    import torch
    from lm_eval.models.huggingface import HFLM

    from .perplexity import soft_cap, split_model

    class ContinuationOnlyHFLM(HFLM):
        _max_cont = None
        logits_budget = 2**30  # bytes of float32 logits one batch may materialise

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            self._max_cont = max((len(r[2]) for r in requests), default=0)
            rows, self._batch_start = self.batch_size_per_gpu, 0
            self._max_rows = int(rows)
            self.batch_size_per_gpu = "auto"  # makes lm-eval batch through _batch_scheduler below
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._max_cont, self.batch_size_per_gpu = None, rows

        def _batch_scheduler(self, pos, requests):
            """lm-eval's chunker asks, after adding row `pos`, how long the current batch should be, and cuts it
            when the answer equals its length: cut at `max_rows`, or before a row that would exceed the budget."""
            rows = pos - self._batch_start + 1
            if rows >= self._max_rows or (pos + 1 < len(requests) and self._logit_bytes(requests, pos + 1)
                                          > self.logits_budget):
                self._batch_start = pos + 1
                return rows
            return rows + 1

        def _logit_bytes(self, requests, last: int) -> int:
            """Bytes of the logits _model_call would return for rows batch_start..last (sorted longest first)."""
            def length(i):
                return len(requests[i][1]) + len(requests[i][2]) - 1

            first = self._batch_start
            positions = min(length(first), length(first) - length(last) + self._max_cont)
            return (last - first + 1) * positions * self.model.config.vocab_size * 4

        def _model_call(self, inps, attn_mask=None, labels=None):
            parts = split_model(self.model)
            if attn_mask is not None or labels is not None or parts is None or self._max_cont is None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            decoder, head, softcap = parts
            with torch.no_grad():
                padded = inps.shape[1]
                is_pad = (inps == 0).flip(1).cumprod(1)  # 1 on the trailing run of zeros
                lengths = padded - is_pad.sum(1)
                start = max(0, int(lengths.min()) - self._max_cont)
                hidden = decoder(input_ids=inps, use_cache=False).last_hidden_state[:, start:]
                return soft_cap(head(hidden), softcap)

    return ContinuationOnlyHFLM


def _metrics(task_result: dict) -> dict:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys -> {'acc': .., 'acc_stderr': ..}; perplexity kept too."""
    out = {}
    for key, value in task_result.items():
        metric, _, filt = key.partition(",")
        if filt != "none" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[metric] = float(value)
    return out


def _evaluate_one(source: str, task: str, simple_evaluate, kwargs: dict) -> dict:
    """simple_evaluate, with a failure to fetch a hub dataset turned into one clear sentence."""
    if source != "hub":
        return simple_evaluate(**kwargs)
    try:
        return simple_evaluate(**kwargs)
    except (OSError, ConnectionError, ValueError, RuntimeError) as exc:
        files = ", ".join(TASKS[task].files)
        raise JointRankError(
            f"{task}: could not load the hub dataset ({type(exc).__name__}); for offline use give --data-dir or "
            f"{data_mod.ENV_VAR} holding {files}"
        ) from exc


def _per_doc(samples: list[dict]) -> dict:
    """0/1 correctness per scored document, in document order, as compact strings ('0110...') per metric.

    With these, ``compare`` can compute the *paired* standard error of a difference (both runs score the same
    documents), which is much smaller than the unpaired one when the two models mostly agree."""
    ordered = sorted(samples, key=lambda x: x["doc_id"])
    out = {}
    for metric in ("acc", "acc_norm"):
        values = [x.get(metric) for x in ordered]
        if values and all(v in (0, 1, True, False) for v in values):
            out[metric] = "".join("1" if v else "0" for v in values)
    return out


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    data_dir: Path | None,
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 8,
    progress: bool = True,
    on_task_done=None,
) -> dict:
    """Score TASKS with lm-eval; returns {task: {metrics..., n, n_total, indices, wall_time_s, source}}."""
    unknown = [t for t in tasks if t not in ZEROSHOT_TASKS]
    if unknown:
        raise JointRankError(f"unknown zero-shot task(s): {', '.join(unknown)}; known: {', '.join(ZEROSHOT_TASKS)}")
    if tokenizer is None:
        raise JointRankError("zero-shot evaluation needs a tokenizer, and the model came without one")
    if data_dir is None:
        data_mod.require_hub(tasks)
    from lm_eval import simple_evaluate
    # One HFLM for all tasks. It takes the model object as is (dense, compressed or reloaded) on its own device.
    lm = _continuation_only_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    results = {}
    with contextlib.ExitStack() as stack:
        if data_dir is not None:
            manager, names = stack.enter_context(local_tasks(tasks, data_dir))
            source = f"local:{data_dir}"
        else:
            from lm_eval.tasks import TaskManager

            manager, source = TaskManager(), "hub"
            names = {t: (t, TASKS[t].rows) for t in tasks}
        for task in tasks:  # one task per call, so each gets its own wall time
            name, n_total = names[task]
            indices = sample_indices(task, n_total, limit, seed)
            started = time.perf_counter()
            out = _evaluate_one(source, task, simple_evaluate, dict(
                model=lm,
                tasks=[name],
                task_manager=manager,
                num_fewshot=0,
                samples={name: indices} if indices is not None else None,
                log_samples=True,  # per-document correctness, for paired standard errors in compare
                bootstrap_iters=BOOTSTRAP_ITERS,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                verbosity="ERROR",
            ))
            wall = time.perf_counter() - started
            n_eff = out["n-samples"][name]["effective"]
            if n_eff != (len(indices) if indices is not None else n_total):
                raise JointRankError(f"{task}: lm-eval scored {n_eff} documents, expected {len(indices) if indices else n_total}")
            results[task] = {
                **_metrics(out["results"][name]),
                "n": n_eff,
                "n_total": n_total,
                "sample_seed": seed if indices is not None else None,
                "indices": indices,
                "wall_time_s": wall,
                "source": source,
                "lm_eval_task": name,
                "builtin_task_version": out.get("versions", {}).get(name),
                "per_doc": _per_doc(out["samples"][name]),
            }
            if on_task_done is not None:
                on_task_done(task, results[task])
    return results


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # lm-eval forks; silence the tokenizers warning
