"""Reproductions of the paper's experiments (arXiv 2402.16319) on a model you can run: one module per experiment,
each writing JSON (+ PNG) under results/experiments/<name>/; report.py turns them into results/REPORT.md."""

EXPERIMENTS = ("spectra", "joint_vs_separate", "layers", "denoise", "watermark", "table1")
