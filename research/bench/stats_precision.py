"""What forming the calibration second moment's per-batch product in float32 (not float64) costs and saves.

    python research/bench/stats_precision.py [--models gemma-3-270m,qwen2.5-coder-0.5b] [--windows 8] [--repeats 5]

The data-aware methods (SVD-LLM, ASVD, LLM-ROM) and loss-aware allocation accumulate E[x xᵀ] of every unit's input
over the calibration tokens (methods/calibration.InputStats). Since 2026-12-07 each batch's xᵀx is formed in float32
where the activations live and accumulated in float64; before, x was moved to the CPU and multiplied in float64.

Two measurements, written to results/stats_precision.{json,md}:

* **Time**: one batch of 512 tokens through InputStats.add both ways, for the input widths of each model named and of
  Qwen2.5-Coder-1.5B (1536 and 8960, random inputs: the time of a product does not depend on its values), median of
  `--repeats` after a warm-up. A timing: run it on a quiet machine (the load average is recorded beside it).
* **Precision**: on real activations (each model's inputs to every linear of its first, middle and last decoder
  layer, on `--windows` C4 calibration windows of 512), the second moment both ways; its relative difference; and,
  for SVD-LLM and LLM-ROM at half of each unit's break-even rank, the unit's relative output error in the exact
  (float64) metric with factors made from either moment. A difference far below the errors themselves says the
  float32 product changes nothing a user could see.
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

OUT = REPO / "results" / "stats_precision"
WIDTHS_1_5B = (1536, 8960)  # Qwen2.5-Coder-1.5B: hidden, intermediate (down_proj's input)
BATCH = 512


def add_float64(stats, x):
    """InputStats.add as it was before 2026-12-07: the product in float64 on the CPU."""
    import torch

    x = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
    total = stats.tokens + x.shape[0]
    stats.second_moment.mul_(stats.tokens / total).add_(x.T @ x, alpha=1.0 / total)
    stats.mean_abs.mul_(stats.tokens / total).add_(x.abs().sum(0), alpha=1.0 / total)
    stats.tokens = total


def time_widths(widths: list[int], repeats: int) -> list[dict]:
    import torch

    from jointrank.methods.calibration import InputStats

    rows = []
    for d in widths:
        x = torch.randn(BATCH, d, generator=torch.Generator().manual_seed(d))
        times = {}
        for name, add in (("float64", add_float64), ("float32", InputStats.add)):
            stats = InputStats(d)
            add(stats, x)  # warm-up
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                add(stats, x)
                runs.append(time.perf_counter() - t)
            times[name] = statistics.median(runs)
        rows.append({"d_in": d, "seconds_float64": times["float64"], "seconds_float32": times["float32"],
                     "speedup": times["float64"] / times["float32"]})
        print(f"d_in {d}: float64 {times['float64'] * 1e3:.1f} ms, float32 {times['float32'] * 1e3:.1f} ms",
              flush=True)
    return rows


def precision(model_name: str, windows: int) -> tuple[list[dict], list[int]]:
    """Per unit of three layers: the two moments' difference and both methods' output errors from each."""
    from jointrank.architectures import decoder_layers, describe
    from jointrank.methods import factorise
    from jointrank.methods.calibration import InputStats, load_text
    from jointrank.methods.common import output_error
    from jointrank.sources import load_model

    model, tokenizer, _ = load_model(model_name)
    model.float().eval()
    layout = describe(model)
    _, layers = decoder_layers(model)
    picked = sorted({0, len(layers) // 2, len(layers) - 1})
    groups = [g for g in layout.groups if g.layer in picked]
    calibration = load_text(C4_FILE, tokenizer, tokens=windows * BATCH, seed=0)
    both = {}
    hooks = []
    for g in groups:
        new, old = InputStats(g.d_in), InputStats(g.d_in)
        both[(g.layer, g.group)] = (g, new, old)
        module = model.get_submodule(g.members[0].name)

        def both_ways(module, args, new=new, old=old):  # returns None: the input goes on unchanged
            new.add(args[0])
            add_float64(old, args[0])

        hooks.append(module.register_forward_pre_hook(both_ways))
    run_windows_with_hooks(model, calibration.input_ids, hooks)
    rows = []
    for (layer, group), (g, new, old) in both.items():
        weights = [model.get_submodule(m.name).weight.detach() for m in g.members]
        d_out = sum(w.shape[0] for w in weights)
        rank = max(1, (d_out * g.d_in // (d_out + g.d_in)) // 2)
        diff = float((new.second_moment - old.second_moment).norm() / old.second_moment.norm())
        row = {"layer": layer, "group": group, "d_in": g.d_in, "d_out": d_out, "rank": rank,
               "moment_rel_diff": diff}
        for method in ("svd_llm", "llm_rom"):
            errors = [output_error(weights, factorise(method, weights, rank, stats=s), old.second_moment)
                      for s in (old, new)]
            row[f"{method}_error_float64"], row[f"{method}_error_float32"] = errors
        rows.append(row)
        print(f"{model_name} layer {layer} {group}: moment diff {diff:.1e}, svd_llm "
              f"{row['svd_llm_error_float64']:.6f} / {row['svd_llm_error_float32']:.6f}", flush=True)
    widths = sorted({g.d_in for g in layout.groups})
    del model
    return rows, widths


def render(payload: dict) -> str:
    lines = ["# The calibration second moment's product in float32: time and precision", "",
             "Generated by `research/bench/stats_precision.py` from `stats_precision.json`; do not edit by hand.", "",
             f"Command: `{payload['command']}`", "",
             f"Machine: {payload['machine']}; load average {payload['load_avg_1min_start']:.2f} at the start, "
             f"{payload['load_avg_1min_end']:.2f} at the end; run {payload['date']}.", "",
             "## Time: one batch of 512 tokens through InputStats.add (median of "
             f"{payload['repeats']})", "",
             "| input width | float64 product on the CPU, ms | float32 product, ms | speed-up |", "|---|---|---|---|"]
    for r in payload["timing"]:
        lines.append(f"| {r['d_in']} | {r['seconds_float64'] * 1e3:.1f} | {r['seconds_float32'] * 1e3:.1f} | "
                     f"{r['speedup']:.2f}x |")
    lines += ["", "## Precision: real activations, first, middle and last decoder layer", "",
              f"{payload['windows']} C4 calibration windows of 512 tokens. Output errors are relative, "
              "‖(W - W')X‖ / ‖WX‖ in the exact (float64) second moment, at half of each unit's break-even rank; "
              "factors made from the float64 moment / from the float32 one.", "",
              "| model | layer | group | d_in | rank | moment: relative difference | SVD-LLM error | "
              "LLM-ROM error |", "|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for model, rows in payload["precision"].items():
        for r in rows:
            lines.append(f"| {model} | {r['layer']} | {r['group']} | {r['d_in']} | {r['rank']} | "
                         f"{r['moment_rel_diff']:.1e} | {r['svd_llm_error_float64']:.6f} / "
                         f"{r['svd_llm_error_float32']:.6f} | {r['llm_rom_error_float64']:.6f} / "
                         f"{r['llm_rom_error_float32']:.6f} |")
            for m in ("svd_llm", "llm_rom"):
                worst = max(worst, abs(r[f"{m}_error_float32"] - r[f"{m}_error_float64"]))
    lines += ["", f"Largest change of an output error: {worst:.1e} (absolute, on errors of the order shown)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gemma-3-270m,qwen2.5-coder-0.5b")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    load_start = os.getloadavg()[0]
    precision_rows, widths = {}, set(WIDTHS_1_5B)
    for name in args.models.split(","):
        precision_rows[name], model_widths = precision(name, args.windows)
        widths |= set(model_widths)
    timing = time_widths(sorted(widths), args.repeats)
    payload = {
        "command": "python research/bench/stats_precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "load_avg_1min_start": load_start, "load_avg_1min_end": os.getloadavg()[0],
        "repeats": args.repeats, "windows": args.windows, "timing": timing, "precision": precision_rows,
    }
    write_json(OUT.with_suffix(".json"), payload)
    OUT.with_suffix(".md").write_text(render(payload))
    print(f"wrote {OUT.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
