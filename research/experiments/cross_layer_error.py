"""Why a basis shared by adjacent layers loses on Gemma-3-270M: each layer's own output error, whitened, at equal
parameters (issue #15, the measurement behind results/quality.md's xl2 rows).

    python research/experiments/cross_layer_error.py [--tokens 16384]

For each matrix kind (o, down, joint gate/up) and parameter budget (50% and 80% of the kind's dense parameters
kept), every pair of adjacent layers (0-1, 2-3, ...) is factorised two ways by SVD-LLM (whitened by the input's
second moment) at the same parameter count:
  * per layer: each layer at rank k1 with its own second moment C_i;
  * shared: the two layers stacked at the higher rank k2 the saved basis pays for, whitened by the pooled second
    moment (C_a + C_b) / 2 (what --share-layers does).
The quantity each layer's output depends on is its own relative output error on its own inputs,
sqrt(tr(ΔW C_i ΔWᵀ) / tr(W C_i Wᵀ)). Reported: its mean over layers for each variant, and in how many layers sharing
gave the smaller error. Inputs: the self-generated calibration text of results/quality.md (16384 tokens sampled from
the dense model, cached), statistics from the dense model. Writes results/cross_layer_error.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "results" / "cross_layer_error"
KINDS = {"o": ("self_attn", ("o_proj",)), "down": ("mlp", ("down_proj",)), "gate_up": ("mlp", ("gate_proj", "up_proj"))}
KEPT = (0.5, 0.8)


def main(argv=None) -> int:
    import torch

    from jointrank.methods import factorise
    from jointrank.methods.calibration import InputStats, pooled
    from jointrank.methods.common import output_error
    from jointrank.methods.selfgen import self_calibration
    from jointrank.sources import load_model
    from research.bench import quality

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=quality.CAL_TOKENS)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer, _ = load_model(quality.P.model)
    calibration = self_calibration(model, tokenizer, args.tokens, cache_dir=quality.CACHE, progress=False)
    layers = model.model.layers
    stats, handles = {}, []
    for kind, (parent, names) in KINDS.items():
        for i, layer in enumerate(layers):
            module = getattr(getattr(layer, parent), names[0])  # a joint group's members read the same input
            stats[kind, i] = InputStats(module.in_features)
            handles.append(module.register_forward_pre_hook(lambda m, a, s=stats[kind, i]: s.add(a[0])))
    with torch.no_grad():
        for row in calibration.input_ids:
            model(input_ids=row[None], use_cache=False)
    for h in handles:
        h.remove()

    def weights(kind, i):
        parent, names = KINDS[kind]
        return [getattr(getattr(layers[i], parent), n).weight.detach() for n in names]

    rows = []
    for kind in KINDS:
        for kept in KEPT:
            per_layer, shared = [], []
            for a in range(0, len(layers) - 1, 2):
                pair = (a, a + 1)
                ws = {i: weights(kind, i) for i in pair}
                d_in, d_out = ws[a][0].shape[1], sum(w.shape[0] for w in ws[a])
                k1 = max(1, int(kept * d_out * d_in / (d_in + d_out)))
                k2 = max(1, int(kept * 2 * d_out * d_in / (d_in + 2 * d_out)))
                for i in pair:
                    f = factorise("svd_llm", ws[i], k1, stats=stats[kind, i])
                    per_layer.append(output_error(ws[i], f, stats[kind, i].second_moment))
                both = factorise("svd_llm", ws[a] + ws[a + 1], k2, stats=pooled([stats[kind, a], stats[kind, a + 1]]))
                n = len(ws[a])
                for j, i in enumerate(pair):
                    own = SimpleNamespace(basis=both.basis, outs=both.outs[j * n:(j + 1) * n])
                    shared.append(output_error(ws[i], own, stats[kind, i].second_moment))
            better = sum(s < q for s, q in zip(shared, per_layer))
            rows.append({"kind": kind, "kept": kept, "rank_per_layer": k1, "rank_shared": k2,
                         "mean_error_per_layer": sum(per_layer) / len(per_layer),
                         "mean_error_shared": sum(shared) / len(shared), "layers_where_sharing_is_better": better,
                         "layers": len(shared), "per_layer": per_layer, "shared": shared})
            print(f"{kind} kept {kept:.0%}: per layer {rows[-1]['mean_error_per_layer']:.4f} (rank {k1}), shared "
                  f"{rows[-1]['mean_error_shared']:.4f} (rank {k2}); sharing better in {better}/{len(shared)} layers",
                  flush=True)
    command = "python " + " ".join(["research/experiments/cross_layer_error.py", *sys.argv[1:]])
    OUT.with_name(OUT.name + ".json").write_text(json.dumps({"command": command, "tokens": calibration.tokens,
                                                             "rows": rows}, indent=1) + "\n")
    lines = ["# Shared across two layers or per layer: each layer's own whitened output error (Gemma-3-270M)", "",
             f"Generated by `{command}` (method in its docstring): SVD-LLM factors, {calibration.tokens} "
             "self-generated calibration tokens, layers paired 0-1, 2-3, ...; equal parameters in both variants.", "",
             "| kind | params kept | rank per layer | rank shared | mean relative output error, per layer | "
             "shared | layers where sharing is better |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['kept']:.0%} | {r['rank_per_layer']} | {r['rank_shared']} | "
                     f"{r['mean_error_per_layer']:.4f} | {r['mean_error_shared']:.4f} | "
                     f"{r['layers_where_sharing_is_better']}/{r['layers']} |")
    OUT.with_name(OUT.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
