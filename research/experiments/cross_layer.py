"""Is a basis shared across adjacent layers worth building on Gemma-3-270M? (issue #15, requirement 2, a probe)

    python research/experiments/cross_layer.py [--windows 32] [--ratios 0.5,0.3] [--kinds down,o,gate_up]

For one matrix kind at a time (the rest of the model dense), every layer's matrices are replaced by a rank-k
reconstruction at the same parameter count:
  * per layer (n=1): each layer's own input basis (for gate_up: the seed paper's joint [W_gate; W_up]);
  * shared by n adjacent layers (n=2, 3): the matrices of layers i..i+n-1 stacked and factorised once, one input
    basis B (k x d_in) stored once for the n layers, one output factor per member and layer.
Parameters kept = RATIO x that kind's dense parameters in every variant: sharing stores d_in x k once per n layers,
so it affords a larger k (k_n = RATIO * n * sum(d_out) * d_in / (d_in + n * sum(d_out))). A layer of 18 that is
left over by n keeps its own basis. Data-free (plain SVD of the stack). The reconstructed dense matrices go into the
model, which computes the same function as the factorised modules would; perplexity on the WikiText-2 windows of
results/quality.md, paired per window against the per-layer variant.

Writes results/cross_layer.json and results/cross_layer.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from research.bench import quality  # noqa: E402
from research.common import mean_se, write_json  # noqa: E402

OUT_JSON, OUT_MD = REPO / "results" / "cross_layer.json", REPO / "results" / "cross_layer.md"
KINDS = {"down": ("mlp", ("down_proj",)), "o": ("self_attn", ("o_proj",)), "gate_up": ("mlp", ("gate_proj", "up_proj"))}


def members(model, kind: str, layer: int):
    parent, names = KINDS[kind]
    return [getattr(getattr(model.model.layers[layer], parent), n) for n in names]


def reconstruct(model, dense_weights: dict, kind: str, ratio: float, n: int) -> dict:
    """Write the rank-k reconstructions of `kind` (shared by n adjacent layers) into the model; return the facts."""
    import torch

    from jointrank.linalg import joint_rank_k

    layers = len(model.model.layers)
    params_dense = params_after = 0
    errors = []
    for start in range(0, layers, n):
        span = list(range(start, min(start + n, layers)))
        weights = [dense_weights[(kind, layer, i)] for layer in span for i in range(len(KINDS[kind][1]))]
        d_in, d_outs = weights[0].shape[1], [w.shape[0] for w in weights]
        dense = d_in * sum(d_outs)
        k = max(1, int(ratio * dense / (d_in + sum(d_outs))))
        factors = joint_rank_k([w.float() for w in weights], k, solver="svd")
        params_dense += dense
        params_after += k * (d_in + sum(d_outs))
        mods = [m for layer in span for m in members(model, kind, layer)]
        with torch.no_grad():
            for m, w, a in zip(mods, weights, factors.outs):
                approx = a @ factors.basis
                errors.append(((approx - w).norm() / w.norm()).item())
                m.weight.copy_(approx.to(m.weight.dtype))
    return {"params_dense": params_dense, "params_after": params_after, "kept": params_after / params_dense,
            "mean_rel_error": sum(errors) / len(errors)}


def main(argv=None) -> int:
    import torch

    from jointrank.sources import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--ratios", default="0.5,0.3")
    p.add_argument("--kinds", default="down,o,gate_up")
    p.add_argument("--spans", default="1,2,3")
    args = p.parse_args(argv)
    quality.P.windows = args.windows
    torch.set_num_threads(2)
    model, tokenizer, _ = load_model(quality.P.model)
    kinds = args.kinds.split(",")
    dense_weights = {(kind, layer, i): m.weight.detach().clone()
                     for kind in kinds for layer in range(len(model.model.layers))
                     for i, m in enumerate(members(model, kind, layer))}
    results = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {"points": []}
    if results.get("windows") not in (None, args.windows):
        results = {"points": []}  # another protocol: start over
    results["windows"] = args.windows
    done = {(q["kind"], q["ratio"], q["span"]) for q in results["points"]}
    for kind in kinds:
        for ratio in (float(r) for r in args.ratios.split(",")):
            for n in (int(s) for s in args.spans.split(",")):
                if (kind, ratio, n) in done:
                    continue
                facts = reconstruct(model, dense_weights, kind, ratio, n)
                facts["perplexity"] = quality.measure_perplexity(model, tokenizer)
                results["points"].append({"kind": kind, "ratio": ratio, "span": n, **facts})
                write_json(OUT_JSON, results)
                print(f"{kind} ratio {ratio} span {n}: kept {facts['kept']:.4f}, rel err "
                      f"{facts['mean_rel_error']:.4f}, ppl {facts['perplexity']['perplexity']:.2f}", flush=True)
                with torch.no_grad():  # back to dense for the next variant
                    for layer in range(len(model.model.layers)):
                        for i, m in enumerate(members(model, kind, layer)):
                            m.weight.copy_(dense_weights[(kind, layer, i)])
    report(results)
    return 0


def report(results: dict) -> None:
    by = {(q["kind"], q["ratio"], q["span"]): q for q in results["points"]}
    lines = ["# A basis shared across adjacent layers: probe on Gemma-3-270M (data-free)", "",
             "Generated by `python research/experiments/cross_layer.py` (see its docstring for the method): one "
             "matrix kind compressed at a time, every variant at the same parameter count, perplexity on "
             f"{results['windows']} WikiText-2 windows of 512 (results/quality.md's), paired per window against the "
             "per-layer variant (span 1). Negative ΔNLL: sharing better.", "",
             "| kind | params kept | span (layers sharing a basis) | mean rel. weight error | perplexity | "
             "ΔNLL vs span 1 ± SE |", "|---|---|---|---|---|---|"]
    for (kind, ratio, n), q in sorted(by.items()):
        base = by.get((kind, ratio, 1))
        if base is not None and n != 1:
            d, se = mean_se([a - b for a, b in zip(q["perplexity"]["per_window_nll"],
                                                   base["perplexity"]["per_window_nll"])])
            cell = f"{d:+.4f} ± {se:.4f}" + (" (sharing better)" if d < -2 * se else " (per layer better)"
                                               if d > 2 * se else " (within 2 SE)")
        else:
            cell = "—"
        lines.append(f"| {kind} | {q['kept']:.3f} | {n} | {q['mean_rel_error']:.4f} | "
                     f"{q['perplexity']['perplexity']:.2f} | {cell} |")
    lines.append("")
    OUT_MD.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
