"""Diagnostic: weight-space error vs error on real activations. A data-free rank-k keeps the directions with the most
*weight* energy; the model's inputs need not live there. For each layer and member this records the relative error
‖W − Ŵ‖_F / ‖W‖_F next to ‖(W − Ŵ) X‖_F / ‖W X‖_F for real inputs X (one WikiText-2 window, captured with hooks),
and the share of the input energy along the input's top direction. If the second is much larger than the first, a
small weight error turns into a large output error, and the perplexity results that follow are explained.
"""

from __future__ import annotations

import time

import torch

from .common import PplProbe, load, make_units, parse_floats, pyplot, save_result, set_threads, stamp
from jointrank.linalg import joint_rank_k

NAME = "activations"
SETTINGS = (("gate_up", "joint"), ("qk", "joint"), ("qk", "separate"), ("down", "separate"))


@torch.no_grad()
def run(model_spec: str, *, ratios=(0.98, 0.9, 0.7), tokens: int = 256, window_seed: int = 0, data_dir=None,
        text: str | None = None, out: str | None = None, command: str = "", model=None, tokenizer=None,
        plot: bool = True) -> dict:
    started = time.perf_counter()
    set_threads()
    ratios = parse_floats(ratios, "--ratios")
    if model is None:
        model, tokenizer = load(model_spec)
    probe = PplProbe.build(tokenizer, text=text, data_dir=data_dir, seqlen=tokens, max_windows=1, seed=window_seed)
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for group, method in SETTINGS:
        for unit in make_units(model, group, method):
            name = unit.parts[0].module
            if name not in inputs:
                hooks.append(model.get_submodule(name).register_forward_hook(
                    lambda mod, args, out, name=name: inputs.__setitem__(name, args[0][0].detach().float())))
                inputs[name] = None
    try:
        model(input_ids=probe.windows[:1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for group, method in SETTINGS:
        for unit in make_units(model, group, method):
            x = inputs[unit.parts[0].module]
            weights = [model.get_submodule(p.module).weight.detach().float() for p in unit.parts]
            s = torch.linalg.svdvals(x.double())
            for ratio in ratios:
                limit = min(sum(w.shape[0] for w in weights), weights[0].shape[1])
                k = max(1, min(limit, round(ratio * limit)))
                f = joint_rank_k(weights, k)
                for part, w, a, werr in zip(unit.parts, weights, f.outs, f.member_rel_errors):
                    act = float((x @ (w - a @ f.basis).T).norm() / (x @ w.T).norm())
                    rows.append({"layer": unit.layer, "group": group, "method": method,
                                 "member": part.module.rsplit(".", 1)[1].removesuffix("_proj"), "ratio": ratio,
                                 "rank": k, "weight_rel_error": werr, "activation_rel_error": act,
                                 "input_top_direction_share": float(s[0] ** 2 / (s ** 2).sum())})
    summary = {}
    for group, method in SETTINGS:
        for ratio in ratios:
            sel = [r for r in rows if r["group"] == group and r["method"] == method and r["ratio"] == ratio]
            for member in sorted({r["member"] for r in sel}):
                m = [r for r in sel if r["member"] == member]
                w = sum(r["weight_rel_error"] for r in m) / len(m)
                a = sum(r["activation_rel_error"] for r in m) / len(m)
                summary[f"{group}/{method}/{member}/{ratio}"] = {
                    "group": group, "method": method, "member": member, "ratio": ratio, "weight_rel_error": w,
                    "activation_rel_error": a, "amplification": a / w if w > 0 else float("nan"),
                    "layers_amplified": sum(r["activation_rel_error"] > r["weight_rel_error"] for r in m),
                    "layers": len(m)}
    result = {"experiment": NAME, "model": model_spec, "ratios": ratios, "probe": probe.describe(),
              "summary": list(summary.values()), "rows": rows, "meta": stamp(command, started)}
    return save_result(NAME, out, result, _plot if plot else None)


def _plot(result: dict, path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 5))
    for i, (group, method) in enumerate(SETTINGS):
        sel = [r for r in result["rows"] if r["group"] == group and r["method"] == method]
        ax.scatter([r["weight_rel_error"] for r in sel], [r["activation_rel_error"] for r in sel], s=8,
                   label=f"{group} {method}", color=f"C{i}", alpha=0.7)
    lim = max(max(r["activation_rel_error"] for r in result["rows"]), max(r["weight_rel_error"] for r in result["rows"]))
    ax.plot([0, lim], [0, lim], color="gray", lw=0.8, ls="--", label="output error = weight error")
    ax.set_xlabel("‖W − Ŵ‖ / ‖W‖ (weight space)")
    ax.set_ylabel("‖(W − Ŵ)X‖ / ‖WX‖ (real inputs)")
    ax.set_title(f"{result['model']}: data-free rank-k error, weights vs activations")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
