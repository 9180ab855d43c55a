"""Evaluation: perplexity and zero-shot accuracy of any causal LM (dense, compressed in memory, or reloaded).

    from jointrank.evaluate import evaluate
    results = evaluate(model, tokenizer, ["wikitext2", "piqa"], data_dir="../shared/data", limit=500)

returns the same dict that ``jointrank eval --out`` writes (see report.SCHEMA).

Modules: tasks (the task records and groups), data (where the data comes from), perplexity, zeroshot (lm-eval),
run (one evaluation and its results document), report (results files, Markdown, comparison), cli.
"""

from __future__ import annotations

from .data import check_data
from .run import evaluate
from .tasks import GROUPS, KNOWN, ZEROSHOT_TASKS, parse_tasks

__all__ = ["evaluate", "parse_tasks", "KNOWN", "GROUPS", "ZEROSHOT_TASKS", "check_data"]
