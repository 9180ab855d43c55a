"""Experiment 3 (the paper's Table 2): which layers matter for joint rank-k of gate/up.

Two designs, both at one approximation ratio (paper: joint rank-2048 of LLaMA's 4096-wide gate/up = ratio 0.5):
  quarters  the paper's Table 2 (one quarter left unchanged, the other three approximated; plus none/all
            unchanged), and the converse the issue asks for (only one quarter approximated, the rest untouched).
  single    one layer at a time approximated, every other layer untouched: the per-layer sensitivity curve.
The paper's claim: bottom layers matter more (leaving the first quarter unchanged helps most). With perplexity on a
few windows the comparison is paired (same windows), so standard errors are those of the differences.
"""

from __future__ import annotations

import time

from jointrank import JointRankError
from jointrank.plan import parse_layers
from .common import PplProbe, RankSweep, load, make_units, out_dir, paired, pyplot, set_threads, stamp, write_json

NAME = "layers"


def quarters(n: int) -> list[list[int]]:
    """Four contiguous blocks as even as possible, the larger ones first (18 layers -> 5, 5, 4, 4)."""
    size, extra = divmod(n, 4)
    out, start = [], 0
    for q in range(4):
        length = size + (1 if q < extra else 0)
        out.append(list(range(start, start + length)))
        start += length
    return out


def run(model_spec: str, *, ratio: float = 0.5, parts=("quarters", "single"), single_layers: str = "all",
        seqlen: int = 512, max_windows: int = 4, window_seed: int = 0, data_dir=None, text: str | None = None,
        evaluate: bool = True, out: str | None = None, command: str = "", model=None, tokenizer=None,
        plot: bool = True) -> dict:
    started = time.perf_counter()
    set_threads()
    if not 0 < ratio <= 1:
        raise JointRankError(f"--ratio must be in (0, 1]; got {ratio}")
    unknown = [p for p in parts if p not in ("quarters", "single")]
    if unknown or not parts:
        raise JointRankError(f"--parts: choose quarters, single or both; got {','.join(parts) or 'nothing'}")
    if not evaluate:
        raise JointRankError("the layers experiment measures perplexity; it cannot run with --no-eval")
    if model is None:
        model, tokenizer = load(model_spec)
    probe = PplProbe.build(tokenizer, text=text, data_dir=data_dir, seqlen=seqlen, max_windows=max_windows,
                           seed=window_seed)
    sweep = RankSweep(model, make_units(model, "gate_up", "joint", "all"))
    n = model.config.num_hidden_layers
    dense = probe.measure(model)
    rows = []

    def measure(kind: str, label: str, approximated: list[int]) -> None:
        stats = sweep.apply(ratio, layers=set(approximated))
        m = probe.measure(model)
        rows.append({"kind": kind, "label": label, "approximated_layers": approximated,
                     "params_removed": stats["params_dense"] - stats["params_factored"], "ppl": m["ppl"],
                     "window_nll": m["window_nll"], **paired(dense, m)})

    blocks = quarters(n)
    if "quarters" in parts:
        measure("all_approximated", "none unchanged", list(range(n)))
        for q, block in enumerate(blocks):
            if block:  # fewer than four layers leave some quarters empty
                rest = [i for i in range(n) if i not in block]
                measure("quarter_unchanged", f"quarter {q + 1} unchanged (layers {block[0]}-{block[-1]})", rest)
        for q, block in enumerate(blocks):
            if block:
                measure("quarter_only", f"only quarter {q + 1} approximated (layers {block[0]}-{block[-1]})", block)
    if "single" in parts:
        for i in parse_layers(single_layers, n):
            measure("single", f"layer {i}", [i])
    sweep.restore()
    result = {"experiment": NAME, "model": model_spec, "ratio": ratio, "group": "gate_up", "method": "joint",
              "num_layers": n, "quarters": blocks, "probe": probe.describe(), "dense": dense, "rows": rows,
              "meta": stamp(command, started)}
    target = out_dir(NAME, out)
    name = NAME if set(parts) == {"quarters", "single"} else f"{NAME}_{'_'.join(parts)}"
    write_json(target / f"{name}.json", result)
    if plot and any(r["kind"] == "single" for r in rows):
        plot_single(result, target / f"{name}.png")
    return result


def plot_single(result: dict, path) -> None:
    plt = pyplot()

    single = [r for r in result["rows"] if r["kind"] == "single"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.errorbar([r["approximated_layers"][0] for r in single], [r["delta_nll"] for r in single],
                yerr=[r["delta_nll_se"] for r in single], marker="o", capsize=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("layer approximated (all others dense)")
    ax.set_ylabel("Δ mean NLL vs dense (± paired SE)")
    ax.set_title(f"{result['model']}: joint rank-k of gate/up at ratio {result['ratio']}, one layer at a time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
