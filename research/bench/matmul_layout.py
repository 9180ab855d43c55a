"""One-token matmuls on this CPU: how fast a weight is read row-major against column-major, per dtype and shape.

    python research/bench/matmul_layout.py      # writes results/matmul_layout.md (+ .json); run it alone

Decode multiplies one token's vector by every weight, so it is bound by how fast a kernel streams the weight.
The shapes are Qwen2.5-Coder-1.5B's gate/up projection (8960 x 1536) and, at 20% of its decoder, the joint
gate/up unit's factors: the basis B (933 x 1536) and one output factor A (8960 x 933). Each call is timed alone,
interleaved across cases, medians; GB/s = weight bytes / time. Small weights stay in cache between
calls, so their GB/s overstates what they get inside a model, where other layers evict them: the whole-model
numbers are research/bench/inference_speed.py's.

A joint unit's members multiply the same projected vector by their own output factors, one call each (gate then
up). The second table times those calls against one call on the factors stacked into one matrix
(column-major, the layout decode uses): what fusing a unit's output calls could save per token.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "matmul_layout"
SHAPES = {"dense gate (8960 x 1536)": (8960, 1536), "factor A (8960 x 933)": (8960, 933),
          "basis B (933 x 1536)": (933, 1536)}
REPEATS = 60
# the joint gate/up unit's output factors of Qwen2.5-Coder-1.5B at 20% and 10% of its decoder (the joint
# structure's ranks there): (d_out of each member, rank)
UNITS = {"gate + up at 20% (2 x 8960 x 933)": ((8960, 8960), 933),
         "gate + up at 10% (2 x 8960 x 1174)": ((8960, 8960), 1174)}


def measure(threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (d_out, d_in) in SHAPES.items():
            row_major = torch.randn(d_out, d_in, dtype=dtype)
            column_major = row_major.t().contiguous().t()  # same values and shape, the other memory order
            # row-major with each row starting on a 64-byte boundary: the same values in a wider buffer, so a
            # kernel's loads stay aligned when a row's bytes are not a multiple of 64 (a rank like 933)
            per_line = 64 // row_major.element_size()
            padded = torch.zeros(d_out, -(-d_in // per_line) * per_line, dtype=dtype)
            padded[:, :d_in] = row_major
            x = torch.randn(1, 1, d_in, dtype=dtype)
            weights = {"row-major": row_major, "column-major": column_major, "row-major, padded": padded[:, :d_in]}
            medians = median_seconds({c: functools.partial(torch.nn.functional.linear, x, w)
                                      for c, w in weights.items()})
            for c, median in medians.items():
                rows.append({"dtype": str(dtype).removeprefix("torch."), "weight": name, "layout": c,
                             "ms": median * 1e3, "gb_per_s": row_major.nbytes / median / 1e9})
    return {"command": "python " + " ".join(sys.argv), "threads": threads, "repeats": REPEATS,
            "units": measure_units(),
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg_1min": float(Path("/proc/loadavg").read_text().split()[0]), "rows": rows}


def measure_units() -> list[dict]:
    """Each member's output factor in its own call against one call on the members' factors stacked."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (outs, rank) in UNITS.items():
            stacked = torch.randn(sum(outs), rank, dtype=dtype).t().contiguous().t()  # column-major
            members = [f.t().contiguous().t() for f in stacked.split(outs)]  # each its own column-major tensor
            x = torch.randn(1, 1, rank, dtype=dtype)
            medians = median_seconds({
                "one call per member": lambda: [torch.nn.functional.linear(x, m) for m in members],
                "one stacked call": lambda: torch.nn.functional.linear(x, stacked).split(outs, dim=-1)})
            rows.append({"dtype": str(dtype).removeprefix("torch."), "unit": name, "members": len(outs),
                         **{c: median * 1e3 for c, median in medians.items()}})
    return rows


def median_seconds(cases: dict) -> dict[str, float]:
    """Each case (a no-argument call) timed alone REPEATS times, interleaved across cases after one warm-up call
    each (kernel selection, first touch): the median seconds per case."""
    times = {c: [] for c in cases}
    with torch.inference_mode():
        for call in cases.values():
            call()
        for _ in range(REPEATS):
            for c, call in cases.items():
                t = time.perf_counter()
                call()
                times[c].append(time.perf_counter() - t)
    return {c: statistics.median(v) for c, v in times.items()}


def markdown(r: dict) -> str:
    lines = ["# One-token matmuls: row-major against column-major weights", "",
             f"Generated by `{r['command']}` ({r['started']}, torch {r['torch']}, {r['threads']} threads, medians "
             f"of {r['repeats']} interleaved calls, load average {r['load_avg_1min']:.2f} at the start); do not edit "
             "by hand. " + __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| dtype | weight | row-major ms | row-major GB/s | column-major ms | column-major GB/s "
             "| column / row speed | rows padded to 64 bytes: ms | padded / row speed |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(x["dtype"], x["weight"], x["layout"]): x for x in r["rows"]}
    for dtype in ("float32", "bfloat16"):
        for name in SHAPES:
            row, col = by[(dtype, name, "row-major")], by[(dtype, name, "column-major")]
            pad = by.get((dtype, name, "row-major, padded"))  # runs before it did not time this layout
            lines.append(f"| {dtype} | {name} | {row['ms']:.3f} | {row['gb_per_s']:.1f} | {col['ms']:.3f} | "
                         f"{col['gb_per_s']:.1f} | {row['ms'] / col['ms']:.2f}x | "
                         + (f"{pad['ms']:.3f} | {row['ms'] / pad['ms']:.2f}x |" if pad else "- | - |"))
    if r.get("units"):  # runs before it did not time these
        lines += ["", "A joint unit's output factors (column-major): one call per member against one call on them "
                  "stacked, ms per token (medians).", "",
                  "| dtype | unit | one call per member | one stacked call | saved per unit |", "|---|---|---|---|---|"]
        for u in r["units"]:
            per, one = u["one call per member"], u["one stacked call"]
            lines.append(f"| {u['dtype']} | {u['unit']} | {per:.3f} | {one:.3f} | {per - one:+.3f} ms |")
    return "\n".join(lines) + "\n"


def main() -> int:
    r = measure()
    OUT.with_suffix(".json").write_text(json.dumps(r, indent=1))
    OUT.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
