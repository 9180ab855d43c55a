"""Does balancing stop K being starved? Per-member relative weight error of every joint Q/K and gate/up unit of
Gemma-3-270M, plain stacking vs the balanced options, at equal rank (so at equal parameters). Weights only, no data.

    python research/bench/balanced_members.py        # -> results/balanced_members.json (read by research/bench/report_methods.py)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "balanced_members.json"
RATIOS = (0.25, 0.5)
SPECS = ("svd", "balanced:norm", "balanced:heads", "balanced:alone")


def main() -> int:
    from jointrank.architectures import describe
    from jointrank.methods import factorise
    from jointrank.sources import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, _, _ = load_model("gemma-3-270m")
    layout = describe(model)
    rows = []
    for g in layout.groups:
        if g.group not in ("qk", "gate_up"):
            continue
        weights = [model.get_submodule(m.name).weight.detach() for m in g.members]
        for ratio in RATIOS:
            k = round(ratio * min(sum(w.shape[0] for w in weights), g.d_in))
            row = {"layer": g.layer, "group": g.group, "ratio": ratio, "rank": k}
            for spec in SPECS:
                row[spec] = factorise(spec, weights, k).member_rel_errors
            rows.append(row)
    OUT.write_text(json.dumps({"model": "gemma-3-270m", "ratios": RATIOS, "specs": SPECS, "rows": rows,
                               "command": "python research/bench/balanced_members.py"}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
