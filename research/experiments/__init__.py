"""Reproductions of the paper's experiments (arXiv 2402.16319) on a model you can run: one module per experiment,
each writing JSON (+ PNG) under results/experiments/<name>/; report.py turns them into results/REPORT.md.

Research code, not part of the installed package: run it from the repository root as
`python -m research.experiments experiment NAME MODEL ...` (see cli.py)."""
