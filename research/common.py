"""Helpers shared by the experiments (research/experiments) and the benches (research/bench).

Research code only: it uses the public jointrank API and is not installed with the package."""

from __future__ import annotations

# Accuracy of guessing: 1 / number of answer choices (ARC has a few 3- and 5-choice questions; 4 is the norm).
CHANCE = {"piqa": 1 / 2, "hellaswag": 1 / 4, "winogrande": 1 / 2, "boolq": 1 / 2, "openbookqa": 1 / 4,
          "arc_easy": 1 / 4, "arc_challenge": 1 / 4}
