"""Helpers shared by the experiments (research/experiments) and the benches (research/bench).

Research code only: it uses the public jointrank API and is not installed with the package."""

from __future__ import annotations

import os
from pathlib import Path

from jointrank.evaluate import report as evaluate_report


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample stddev / sqrt(n)); the error is nan for a single value. Given paired
    differences (per window, per document), the error is the paired standard error of the mean difference."""
    n = len(values)
    mean = sum(values) / n
    se = (sum((x - mean) ** 2 for x in values) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return mean, se

# Accuracy of guessing: 1 / number of answer choices (ARC has a few 3- and 5-choice questions; 4 is the norm).
CHANCE = {"piqa": 1 / 2, "hellaswag": 1 / 4, "winogrande": 1 / 2, "boolq": 1 / 2, "openbookqa": 1 / 4,
          "arc_easy": 1 / 4, "arc_challenge": 1 / 4}


def write_json(path: str | os.PathLike, payload: dict, *, indent: int = 2, default=None, newline: bool = True) -> Path:
    """The package's atomic JSON writer, path first as the research code calls it. `indent`, `default` and
    `newline` (a final newline) keep each result file's existing layout, so rewriting one changes no bytes."""
    return evaluate_report.write_json(payload, path, indent=indent, default=default, newline=newline)


def run_windows_with_hooks(model, input_ids, hooks: list) -> None:
    """Run each calibration window through `model` (no gradients, no cache) for what forward hooks collect, then
    remove `hooks` (their handles), also when a window fails."""
    import torch

    try:
        with torch.no_grad():
            for row in input_ids:
                model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
