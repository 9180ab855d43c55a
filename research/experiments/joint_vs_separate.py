"""Experiment 2 (the paper's Figure 3): joint vs separate rank-k, at equal approximation ratio and at equal parameters.

Settings (each is one piece, written to its own JSON so long sweeps can run in parts):
  gate_up  W_gate and W_up of every layer: one joint unit [gate; up] vs one unit each.
  qk       W_Q and W_K, whole matrices: [Q; K] vs Q and K separately.
  qk_head  within each attention head: [Q_h; K_h] vs Q_h and K_h separately. Under GQA a K head serves several
           query heads, so the model is first expanded to one K (and V) head per query head (same function,
           checked in the tests), and each head keeps its own K approximation: that stores K once per query head.
Ranks follow the core's rule, k = round(ratio * min(sum d_out, d_in)) per unit. Parameter counts are Eq. 9 per unit;
`params_reference` is what the original (unexpanded) dense matrices hold, the denominator of "params kept".
"""

from __future__ import annotations

import time

from jointrank import JointRankError
from .common import (PplProbe, RankSweep, expand_kv_heads, load, make_units, out_dir, paired, parse_floats, pyplot,
                     set_threads, stamp, summarise_units, write_json)

NAME = "joint_vs_separate"
SETTINGS = {"gate_up": ("gate_up", False), "qk": ("qk", False), "qk_head": ("qk", True)}
DEFAULT_RATIOS = (0.9, 0.7, 0.5, 0.3)


def _reference_params(model, group: str, layers: str) -> int:
    units = make_units(model, group, "joint", layers)
    return sum(sum(model.get_submodule(p.module).weight.numel() for p in u.parts) for u in units)


def run(model_spec: str, *, settings=("gate_up", "qk", "qk_head"), ratios=DEFAULT_RATIOS, layers: str = "all",
        seqlen: int = 512, max_windows: int = 4, window_seed: int = 0, data_dir=None, text: str | None = None,
        evaluate: bool = True, out: str | None = None, command: str = "", model=None, tokenizer=None,
        plot: bool = True, tag: str | None = None) -> dict:
    set_threads()
    ratios = parse_floats(ratios, "--ratios")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise JointRankError(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if model is None:
        model, tokenizer = load(model_spec)
    probe = PplProbe.build(tokenizer, text=text, data_dir=data_dir, seqlen=seqlen, max_windows=max_windows,
                           seed=window_seed) if evaluate else None
    dense = probe.measure(model) if probe else None
    target = out_dir(NAME, out)
    results = {}
    # qk_head expands K/V in place (same function, so the dense baseline stands), hence it runs last.
    for setting in sorted(settings, key=lambda s: s == "qk_head"):
        started = time.perf_counter()
        group, per_head = SETTINGS[setting]
        reference = _reference_params(model, group, layers)
        if per_head:
            expand_kv_heads(model)
        points = []
        for method in ("joint", "separate"):
            sweep = RankSweep(model, make_units(model, group, method, layers, per_head=per_head))
            for ratio in ratios:
                stats = sweep.apply(ratio)
                point = {"method": method, "ratio": ratio, "params_factored": stats["params_factored"],
                         "params_dense_units": stats["params_dense"], "params_reference": reference,
                         "params_kept": stats["params_factored"] / reference,
                         "ranks": sorted({u["rank"] for u in stats["units"]}), **summarise_units(stats["units"])}
                if probe:
                    m = probe.measure(model)
                    point.update(ppl=m["ppl"], mean_nll=m["mean_nll"], window_nll=m["window_nll"], **paired(dense, m))
                points.append(point)
            sweep.restore()
        result = {"experiment": NAME, "setting": setting, "group": group, "per_head": per_head, "layers": layers,
                  "model": model_spec, "ratios": ratios, "probe": probe.describe() if probe else None,
                  "dense": dense, "points": points, "equal_params": equal_params(points),
                  "meta": stamp(command, started)}
        stem = f"{setting}_{tag}" if tag else setting  # a tag keeps a second sweep of one setting beside the first
        result["tag"] = tag
        write_json(target / f"{stem}.json", result)
        if plot:
            plot_setting(result, target / f"{stem}.png")
        results[setting] = result
    return results


def equal_params(points: list[dict]) -> list[dict]:
    """At each joint point's parameter count, separate's Δ NLL interpolated (linearly in params) from its sweep."""
    if not points or "delta_nll" not in points[0]:
        return []
    sep = sorted((p["params_factored"], p["delta_nll"], p["delta_nll_se"]) for p in points if p["method"] == "separate")
    rows = []
    for p in sorted((p for p in points if p["method"] == "joint"), key=lambda p: p["params_factored"]):
        x = p["params_factored"]
        for (x0, y0, s0), (x1, y1, s1) in zip(sep, sep[1:]):
            if x0 <= x <= x1:
                t = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
                rows.append({"params": x, "params_kept": p["params_kept"], "joint_ratio": p["ratio"],
                             "joint_delta_nll": p["delta_nll"], "joint_delta_nll_se": p["delta_nll_se"],
                             "separate_delta_nll_interp": y0 + t * (y1 - y0),
                             "separate_delta_nll_se_interp": max(s0, s1)})
                break
    return rows


def plot_setting(result: dict, path) -> None:
    plt = pyplot()

    evaluated = "delta_nll" in result["points"][0]
    fig, axes = plt.subplots(1, 3 if evaluated else 1, figsize=(15 if evaluated else 5.5, 4.3), squeeze=False)
    axes = axes[0]
    styles = {"joint": dict(marker="o", color="C0"), "separate": dict(marker="s", color="C3")}
    for method in ("joint", "separate"):
        pts = sorted((p for p in result["points"] if p["method"] == method), key=lambda p: p["ratio"])
        for member in pts[0]["member_rel_error"]:
            axes[0].plot([p["ratio"] for p in pts], [p["member_rel_error"][member] for p in pts],
                         ls="-" if member in ("q", "gate") else "--", label=f"{method}: {member}", **styles[method])
        if evaluated:
            for ax, key in ((axes[1], "ratio"), (axes[2], "params_kept")):
                ax.errorbar([p[key] for p in pts], [p["delta_nll"] for p in pts],
                            yerr=[p["delta_nll_se"] for p in pts], capsize=3, label=method, **styles[method])
    axes[0].set_xlabel("approximation ratio")
    axes[0].set_ylabel("relative reconstruction error ‖W−Ŵ‖/‖W‖ (mean over layers)")
    axes[0].legend(fontsize=7)
    if evaluated:
        axes[1].set_xlabel("approximation ratio (equal ratio)")
        axes[2].set_xlabel("parameters kept / dense (equal parameters)")
        for ax in axes[1:]:
            ax.set_ylabel("Δ mean NLL vs dense (± paired SE)")
            ax.set_yscale("symlog", linthresh=0.01)
            ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['model']}: {result['setting']} joint vs separate ({result['layers']} layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
