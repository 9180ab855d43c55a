"""The evaluation tasks, one record each: what kind of score, which data files, how many rows the official split
has, and (zero-shot) which lm-eval built-in task scores it. Every other module reads task facts from here.

(Until this module the same facts lived in five parallel tables across data.py, zeroshot.py, perplexity.py,
report.py and evaluate/__init__.py; adding a task meant editing all of them.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import JointRankError

PERPLEXITY, ZEROSHOT = "perplexity", "zeroshot"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # PERPLEXITY (a text, scored by perplexity.perplexity) or ZEROSHOT (documents, scored by lm-eval)
    files: tuple[str, ...]  # what the task reads, relative to the data dir (named in the "missing data" error)
    rows: int | None  # official evaluation-split size; a parsed file must have exactly this many rows
    builtin: str | None = None  # zero-shot: lm-eval's built-in task YAML, relative to lm_eval/tasks
    split: str | None = None  # zero-shot: the split the built-in task scores on


TASKS: dict[str, Task] = {t.name: t for t in (
    # wikitext-2-raw-v1 test, in lines (HF rows)
    Task("wikitext2", PERPLEXITY, ("wikitext-2-raw/wiki.test.raw",), 4358),
    # exllamav2's 118 C4-style web documents (calibration text, no official split: data.c4_documents counts them)
    Task("c4", PERPLEXITY, ("c4_calibration/exllamav2_c4.utf8",), None),
    Task("piqa", ZEROSHOT, ("piqa/valid.jsonl", "piqa/valid-labels.lst"), 1838, "piqa/piqa.yaml", "validation"),
    Task("hellaswag", ZEROSHOT, ("hellaswag/hellaswag_val_full.txt.bz2",), 10042, "hellaswag/hellaswag.yaml",
         "validation"),
    Task("winogrande", ZEROSHOT, ("winogrande/llm_adapters_winogrande_test.json",
                                  "winogrande/llm_foundry_winogrande.jsonl"), 1267,  # dev (HF "validation")
         "winogrande/default.yaml", "validation"),
    Task("boolq", ZEROSHOT, ("boolq/llm_foundry_boolq.jsonl",), 3270,  # dev (HF "validation")
         "super_glue/boolq/default.yaml", "validation"),
    Task("openbookqa", ZEROSHOT, ("openbookqa/test.jsonl", "openbookqa/ai2_OBQA-Test_question-answers.jsonl"), 500,
         "openbookqa/openbookqa.yaml", "test"),  # test (main)
    Task("arc_easy", ZEROSHOT, ("arc_easy/llm_adapters_ARC-Easy_test.json",
                                "arc_easy/ai2_ARC-Easy-Test_question-answers.jsonl"), 2376, "arc/arc_easy.yaml", "test"),
    Task("arc_challenge", ZEROSHOT, ("arc_challenge/llm_adapters_ARC-Challenge_test.json",
                                     "arc_challenge/ai2_ARC-Challenge-Test_question-answers.jsonl"), 1172,
         "arc/arc_challenge.yaml", "test"),
    Task("lambada_openai", ZEROSHOT, ("lambada_openai/llm_foundry_lambada_openai.jsonl",), 5153,
         "lambada/lambada_openai.yaml", "test"),
)}

PERPLEXITY_TASKS = tuple(name for name, t in TASKS.items() if t.kind == PERPLEXITY)
ZEROSHOT_TASKS = tuple(name for name, t in TASKS.items() if t.kind == ZEROSHOT)
KNOWN = tuple(TASKS)
GROUPS = {
    "paper7": ["piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "arc_easy", "arc_challenge"],
    "zeroshot": list(ZEROSHOT_TASKS),
    "all": ["wikitext2", *ZEROSHOT_TASKS],
}


def parse_tasks(spec: str | list[str]) -> list[str]:
    """'wikitext2,piqa' or a group name (paper7, zeroshot, all) -> ordered, de-duplicated task list."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    tasks: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        for task in GROUPS.get(item, [item]):
            if task not in KNOWN:
                raise JointRankError(f"unknown task {task}; known: {', '.join(KNOWN)} or groups {', '.join(GROUPS)}")
            if task not in tasks:
                tasks.append(task)
    if not tasks:
        raise JointRankError("no tasks given (--tasks)")
    return tasks
