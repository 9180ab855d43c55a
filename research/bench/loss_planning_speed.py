"""What loss-aware allocation's curves cost: the whitened SVD of every candidate, or the Gram eigen-decompositions.

    python research/bench/loss_planning_speed.py [--models smollm2-135m,gemma-3-270m,qwen2.5-coder-1.5b]
                                                 [--windows 4] [--repeats 3]

`--allocation loss` scores every group the rules allow, stacked (if joinable) and each member alone, by the curve
L(k) = ½ Σ_{i>k} σ_i² Σ_j f_j u_ji² of its whitened weights W S (planning/loss.py). Until 2026-12-07 each candidate
took an SVD of W S in float64 (and a Cholesky factor of its input's second moment, 8960 wide on Qwen2.5-Coder-1.5B's
down_proj); planning.loss.option_curves now decomposes the small side's Gram matrix instead, sharing the members'
Grams with their stack. This bench times both on every group of each model's middle decoder layer, with its real
weights, the second moment of its real inputs and the real output Fisher on `--windows` C4 windows of 512, median of
`--repeats`, and records how far the two sets of curves differ (relative to each curve's largest value).

A timing: run it on a quiet machine (the load average is recorded beside it). Written to
results/loss_planning_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `research` importable
    sys.path.insert(0, str(REPO))

from research.bench.quality import C4_FILE  # noqa: E402
from research.common import run_windows_with_hooks, write_json  # noqa: E402

OUT = REPO / "results" / "loss_planning_speed"
WINDOW = 512


def svd_curves(weights, second_moment, fishers, options, damping):
    """The curves as planned before 2026-12-07 (the baseline timed): per option, the Cholesky factor of the damped
    moment and the SVD of the whitened stack."""
    import numpy as np
    import torch

    from jointrank.methods.svd_llm import cholesky_factor

    out = {}
    for idx, k_max in options.items():
        w = torch.cat([weights[i].detach().to(torch.float64) for i in idx])
        f = torch.cat([fishers[i].to(torch.float64) for i in idx])
        u, s, _ = torch.linalg.svd(w @ cholesky_factor(second_moment, damping), full_matrices=False)
        tail = (0.5 * s.pow(2) * (f[:, None] * u.pow(2)).sum(0)).flip(0).cumsum(0).flip(0)
        n = min(k_max, len(s) - 1)
        out[idx] = np.concatenate([tail[1:n + 1].numpy(), np.zeros(k_max - n)])
    return out


def median_seconds(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def measure(model_name: str, windows: int, repeats: int) -> dict:
    import numpy as np

    from jointrank.architectures import describe
    from jointrank.methods.calibration import InputStats, load_text
    from jointrank.planning.loss import candidate_options, option_curves, output_fisher
    from jointrank.sources import load_model

    model, tokenizer, _ = load_model(model_name)
    model.float().eval()
    layout = describe(model)
    layer = layout.num_layers // 2
    groups = [g for g in layout.groups if g.layer == layer]
    calibration = load_text(C4_FILE, tokenizer, tokens=windows * WINDOW, seqlen=WINDOW, seed=0)
    fisher = output_fisher(model, calibration, [m.name for g in groups for m in g.members], progress=False)
    stats, hooks = {}, []
    for g in groups:
        stats[g.group] = InputStats(g.d_in)
        hooks.append(model.get_submodule(g.members[0].name).register_forward_pre_hook(
            lambda m, args, s=stats[g.group]: s.add(args[0])))
    run_windows_with_hooks(model, calibration.input_ids, hooks)
    rows = []
    for g in groups:
        options = candidate_options(g)
        if not options:
            continue
        weights = [model.get_submodule(m.name).weight.detach() for m in g.members]
        fishers = [fisher[m.name] for m in g.members]
        moment = stats[g.group].second_moment

        def old():
            return svd_curves(weights, moment, fishers, options, 0.01)

        def new():
            return option_curves(weights, moment, fishers, options, 0.01)

        a, b = old(), new()  # also the warm-up
        diff = max(float(np.abs(a[i] - b[i]).max() / max(a[i].max(), 1e-300)) for i in options)
        t_old, t_new = median_seconds(old, repeats), median_seconds(new, repeats)
        shapes = [f"{sum(g.members[i].d_out for i in idx)}x{g.d_in}" for idx in options]
        rows.append({"group": g.group, "candidates": shapes, "seconds_svd": t_old, "seconds_gram": t_new,
                     "speedup": t_old / t_new, "max_rel_diff": diff})
        print(f"{model_name} layer {layer} {g.group} {shapes}: SVD {t_old:.2f} s, Gram {t_new:.2f} s, "
              f"curves differ by {diff:.1e}", flush=True)
    del model
    total_old = sum(r["seconds_svd"] for r in rows)
    total_new = sum(r["seconds_gram"] for r in rows)
    return {"model": model_name, "layer": layer, "num_layers": layout.num_layers, "groups": rows,
            "layer_seconds_svd": total_old, "layer_seconds_gram": total_new, "layer_speedup": total_old / total_new}


def render(payload: dict) -> str:
    lines = ["# Loss-aware allocation's curves: whitened SVDs against Gram eigen-decompositions", "",
             "Generated by `research/bench/loss_planning_speed.py` from `loss_planning_speed.json`; do not edit by "
             "hand.", "", f"Command: `{payload['command']}`", "",
             f"Machine: {payload['machine']}; load average {payload['load_avg_1min_start']:.2f} at the start, "
             f"{payload['load_avg_1min_end']:.2f} at the end; run {payload['date']}.", "",
             "Every group of each model's middle decoder layer with its real weights, the second moment of its real "
             f"inputs and the real output Fisher on {payload['windows']} C4 windows of 512; all of the group's "
             "candidates (stacked if joinable, each member alone) as `--allocation loss` scores them; median of "
             f"{payload['repeats']} runs. *Differ*: the largest difference between the two methods' curves, relative "
             "to the curve's largest value.", "",
             "| model | group | candidates (rows x input) | whitened SVDs, s | Gram eigen-decompositions, s | speed-up "
             "| curves differ |", "|---|---|---|---|---|---|---|"]
    for m in payload["models"]:
        for r in m["groups"]:
            lines.append(f"| {m['model']} | {r['group']} | {', '.join(r['candidates'])} | {r['seconds_svd']:.3f} | "
                         f"{r['seconds_gram']:.3f} | {r['speedup']:.1f}x | {r['max_rel_diff']:.1e} |")
        lines.append(f"| {m['model']} | **layer {m['layer']}** | | **{m['layer_seconds_svd']:.2f}** | "
                     f"**{m['layer_seconds_gram']:.2f}** | **{m['layer_speedup']:.1f}x** | |")
    lines += ["", "Per model, the curves of all its layers take about the layer's time times its "
              f"{', '.join(str(m['num_layers']) for m in payload['models'])} layers "
              f"({', '.join(m['model'] for m in payload['models'])}): "
              + "; ".join(f"{m['model']} {m['layer_seconds_svd'] * m['num_layers'] / 60:.1f} min → "
                          f"{m['layer_seconds_gram'] * m['num_layers'] / 60:.1f} min" for m in payload["models"])
              + ", out of loss planning's Fisher pass, one statistics pass over every layer and these curves.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m,qwen2.5-coder-1.5b")
    ap.add_argument("--windows", type=int, default=4, help="C4 windows of 512 for the moments and Fisher")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    load0 = os.getloadavg()[0]
    models = [measure(m, args.windows, args.repeats) for m in args.models.split(",")]
    payload = {"command": "python research/bench/loss_planning_speed.py " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads",
               "date": time.strftime("%Y-%m-%d"), "load_avg_1min_start": load0, "load_avg_1min_end": os.getloadavg()[0],
               "windows": args.windows, "repeats": args.repeats, "models": models}
    write_json(OUT.with_suffix(".json"), payload)
    OUT.with_suffix(".md").write_text(render(payload))
    print(f"wrote {OUT.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
