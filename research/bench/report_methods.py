"""results/methods.json -> results/methods.md + results/methods.png. Every number in the Markdown comes from the JSON."""

from __future__ import annotations

import math
from pathlib import Path

from research.common import mean_se

NOTES = [
    "## How the methods relate (no numbers here: read them above)", "",
    "* **llm_rom and svd_llm solve the same problem.** The rank-k W' minimising the output error "
    "E‖(W - W')x‖² on the calibration inputs projects W onto the top-k principal directions of its outputs, which "
    "is exactly LLM-ROM's W <- U_k(U_kᵀW); SVD-LLM's whitened truncation gives the same W' (up to its damping). "
    "What differs here is where the statistics come from: llm_rom is run layer by layer on the model compressed "
    "so far (each layer sees, and corrects for, the error of the layers before it, as in the LLM-ROM paper); "
    "svd_llm and asvd use the dense model's statistics, as published. tests/test_methods.py checks both "
    "optimality claims numerically.",
    "* **Joint data-aware variants** share one statistic per group input: Q/K (and V) read the same normed hidden "
    "state, gate/up the same pre-MLP normed state. A joint whitened unit stores one basis for both members, so "
    "at equal parameters it gets a higher rank than the separate (published) form; svd_llm vs svd_llm-separate "
    "measures whether that helps.",
    "* **Simplifications against the papers:** one rank rule for every method (uniform ratio or the data-free "
    "global allocation, which stands in for LLM-ROM's module-wise budgets in the global-llm_rom and "
    "global-svd_llm rows: ranks per module from weight spectra, not from the calibration statistics), not "
    "ASVD's sensitivity-based per-layer ranks; ASVD with its default alpha = 0.5, no alpha search; SVD-LLM "
    "without its LoRA parameter-update stage; "
    "a few thousand calibration tokens instead of 128x2048.",
    "* **Global allocation** scores each unit by the relative spectral energy a rank cut throws away, times a "
    "data-free prior, and trades that against parameters with one Lagrange multiplier (units may stay dense). "
    "It is only as good as that proxy: relative weight energy says nothing about how fragile a unit is "
    "(gate/up feed a gated nonlinearity; Gemma's Q/K pass through per-head norms), which the results expose: "
    "over all groups it spends most of the budget on gate/up, the largest units with the cheapest relative "
    "energy per parameter, and that is where this model breaks. Restricted to Q/K (the paper's choice of "
    "matrices) it only moves rank between layers and members, which is the data-free setting where it can "
    "help. The depth and residual priors (global-balanced-depth, global-balanced-residual) shift the budget "
    "away from the layers and groups that break first; the tables above say by how much that helps.",
    "",
]

REFERENCE = "joint-svd"  # the paper's plain joint method, one ratio everywhere
PAPER = ("paper-10", "paper-20", "joint-svd")


def _fmt(x, digits=3):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def paired_delta(point: dict, ref: dict | None) -> tuple[float, float] | None:
    """Mean per-window NLL difference to the reference on the same windows, and its paired standard error."""
    if ref is None or "perplexity" not in ref or "perplexity" not in point:
        return None
    a, b = point["perplexity"]["per_window_nll"], ref["perplexity"]["per_window_nll"]
    return mean_se([x - y for x, y in zip(a, b)])


def best_at(by: dict, rows, budget: float) -> dict | None:
    """The point of ROWS with the lowest probe perplexity at BUDGET, or None if none of them was measured."""
    pts = [by[(r, budget)] for r in rows if (r, budget) in by and "perplexity" in by[(r, budget)]]
    return min(pts, key=lambda p: p["perplexity"]["mean_nll"]) if pts else None


def _balanced_section(path: Path) -> list[str]:
    """Mean per-member relative weight error of the joint units, plain vs balanced stacking at equal rank."""
    import json

    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    out = ["## Balanced stacking: per-member weight error at equal rank (data-free, weights only)", "",
           f"From `{data['command']}` (`results/balanced_members.json`): mean over the 18 layers of each member's "
           "relative Frobenius error ‖W_i - A_i B‖/‖W_i‖, the same rank (hence the same parameters) for every "
           "stacking.", "",
           "| group | rank ratio | member | " + " | ".join(data["specs"]) + " |",
           "|---|---|---|" + "---|" * len(data["specs"])]
    for group, members in (("qk", ("q", "k")), ("gate_up", ("gate", "up"))):
        for ratio in data["ratios"]:
            rows = [r for r in data["rows"] if r["group"] == group and r["ratio"] == ratio]
            if not rows:
                continue
            for i, name in enumerate(members):
                vals = [sum(r[spec][i] for r in rows) / len(rows) for spec in data["specs"]]
                out.append(f"| {group} | {ratio} | {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return out + [""]


def zeroshot_delta(point_z: dict | None, base_z: dict | None) -> tuple[float, float] | None:
    """Zero-shot average minus the dense one, and its standard error paired over the same documents of each task."""
    from jointrank.evaluate.report import paired_stderr

    if not point_z or not base_z:
        return None
    tasks = list(point_z["acc"])
    ses = [paired_stderr({"per_doc": {"acc": base_z["per_doc"][t]}}, {"per_doc": {"acc": point_z["per_doc"][t]}}, "acc")
           for t in tasks]
    if any(se is None for se in ses):
        return None
    delta = sum(point_z["acc"][t] - base_z["acc"][t] for t in tasks) / len(tasks)
    return delta, math.sqrt(sum(se**2 for se in ses)) / len(tasks)


def _zs_cell(z: dict | None, bz: dict | None) -> str:
    if not z:
        return "—"
    d = zeroshot_delta(z, bz)
    return f"{z['avg']:.4f} ± {z['avg_se']:.4f}" + (f" (Δ {d[0]:+.4f} ± {d[1]:.4f})" if d else "")


def _calibration_section(by, budgets, data_free, data_aware, bz) -> list[str]:
    """At each budget: the best data-aware row against the best data-free one (by perplexity), paired."""
    out = ["## What calibration data buys", "",
           "Best data-aware row against the best data-free row at each budget (both chosen by perplexity on the "
           "probe windows); Δ NLL paired over the same windows, zero-shot Δ paired over the same documents.", ""]
    for b in budgets:
        free, aware = best_at(by, data_free, b), best_at(by, data_aware, b)
        if not free or not aware:
            continue
        d = paired_delta(aware, free)
        line = (f"* {b:.0%}: **{aware['row']}** (ppl {_fmt(aware['perplexity']['perplexity'])}, "
                f"{aware['calibration_tokens']} calibration tokens) vs **{free['row']}** (ppl "
                f"{_fmt(free['perplexity']['perplexity'])}): Δ NLL {d[0]:+.4f} ± {d[1]:.4f}")
        line += _zs_versus(aware, free)
        if bz:
            for name, pt in (("data-aware", aware.get("zeroshot")), ("data-free", free.get("zeroshot"))):
                if pt:
                    line += f"; {name} retains {pt['avg'] / bz['avg']:.1%} of the dense zero-shot average"
        out.append(line + ".")
    return out + [""]


def _zs_versus(a: dict, b: dict) -> str:
    """'; zero-shot average A vs B (Δ ± paired SE)' where both points were scored, else ''."""
    za, zb = a.get("zeroshot"), b.get("zeroshot")
    if not za or not zb:
        return ""
    d = zeroshot_delta(za, zb)
    return f"; zero-shot average {za['avg']:.4f} vs {zb['avg']:.4f}" + (f" (Δ {d[0]:+.4f} ± {d[1]:.4f})" if d else "")


def _joint_data_aware_section(by, budgets) -> list[str]:
    """Issue item 6: a joint whitened/PCA unit (one basis per shared input) against the published separate form."""
    lines = []
    for method in ("svd_llm", "llm_rom"):
        for b in budgets:
            j, sep = by.get((method, b)), by.get((f"{method}-separate", b))
            if not j or not sep or "perplexity" not in j or "perplexity" not in sep:
                continue
            d = paired_delta(j, sep)
            verdict = ("joint better" if d[0] + 2 * d[1] < 0 else "separate better" if d[0] - 2 * d[1] > 0
                       else "within 2 s.e.")
            lines.append(f"* {method} at {b:.0%}: ppl {_fmt(j['perplexity']['perplexity'])} (joint) vs "
                       f"{_fmt(sep['perplexity']['perplexity'])} (separate), Δ NLL {d[0]:+.4f} ± {d[1]:.4f}: {verdict}"
                       + _zs_versus(j, sep) + ".")
    if not lines:
        return []
    return ["## Joint data-aware variants against the published (separate) form", "",
            "Same method, same calibration, same budget; Δ NLL = joint − separate, paired over the probe windows "
            "(negative: joint better).", "", *lines, ""]


def _available(results) -> str:
    for p in [results.get("baseline") or {}, *results["points"]]:
        n = p.get("perplexity", {}).get("windows_available")
        if n:
            return f"{n} windows"
    return "all its windows"


def _load_range(points) -> str:
    loads = [p["load_avg_1min"] for p in points if "load_avg_1min" in p]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded"


def write_report(results: dict, md_path: Path, png_path: Path, *, command: str) -> None:
    s = results["settings"]
    base = results.get("baseline") or {}
    points = results["points"]
    rows_meta = s["rows"]
    by = {(p["row"], p["budget"]): p for p in points}
    budgets = sorted({p["budget"] for p in points})
    row_order = [r for r in rows_meta if any(p["row"] == r for p in points)]
    data_free = [r for r in row_order if rows_meta[r]["method"].split(":")[0] in ("svd", "balanced")]

    out = ["# Decomposition methods side by side on Gemma-3-270M", "",
           f"Generated by `{command}` from `results/methods.json` (written by `python research/bench/methods_compare.py run` "
           "and `... zeroshot`, run in pieces under `flock -s /tmp/jointrank-cpu.lock`). Do not edit by hand.", "",
           # the plot is written next to the Markdown; embed it so the report shows what it generates
           f"![Perplexity against parameters removed, per method]({png_path.name})", "",
           "## What was measured, and what was cut", "",
           f"* Model: {s['model']} (float32). Budget = fraction of the **decoder-layer** parameters removed "
           f"(targets {', '.join(f'{b:.0%}' for b in s['budgets'])}); the column *removed* is what the plan "
           "actually removed (a uniform ratio or a global allocation lands at or just above the target).",
           f"* Perplexity: WikiText-2 (raw) test, the first {s['perplexity']['windows']} windows of "
           f"{s['perplexity']['seqlen']} tokens — cut from the full split ({_available(results)}) because of the compute "
           "budget (2 shared cores). ± is the standard error over windows; *Δ NLL vs joint-svd* is the mean "
           "per-window difference in mean NLL against the plain joint method at the same budget, with its paired "
           "standard error (same windows, so far tighter than the perplexities' own errors).",
           f"* Zero-shot: {', '.join(s['zeroshot']['tasks'])}, a seeded subset of {s['zeroshot']['limit']} documents "
           f"each (seed {s['zeroshot']['seed']}; the same documents for every model, and among the 1000 of "
           "`results/gemma-3-270m/baseline.json`: seeded samples are nested), average accuracy ± standard "
           "error (lm-eval's per task, combined); Δ is the difference to the dense model's average on the same "
           "documents, with its paired standard error. Measured only for the points listed. With "
           f"{s['zeroshot']['limit']} documents a task, differences in the average under ~3 points are not resolved.",
           f"* Calibration (data-aware rows only): {s['calibration']['tokens']} tokens of "
           f"`{s['calibration']['file']}` in windows of {s['calibration']['seqlen']} (seed "
           f"{s['calibration']['seed']}), not the 128x2048 of the papers.",
           "* Compress time: one run each on a 2-core machine that was at times shared and overloaded (1-minute "
           f"load average after the points: {_load_range(points)}), so it is indicative only; data-aware rows include the calibration "
           "forward passes, global rows the spectra (computed once per process and reused across budgets).", ""]

    out += ["## Rows", "", "| row | method | allocation | structure | what |", "|---|---|---|---|---|"]
    for r in row_order:
        m = rows_meta[r]
        structure = m["structure"] if isinstance(m["structure"], str) else ", ".join(
            f"{g} {v}" for g, v in m["structure"].items())
        alloc = m["allocation"] + (f" ({m['prior']} prior)" if m.get("prior") else "")
        out.append(f"| {r} | {m['method']} | {alloc} | {structure} | {m['what']} |")
    out.append("")

    bp = base.get("perplexity", {})
    bz = base.get("zeroshot")
    out += ["## Results", "",
            f"Dense baseline: perplexity {_fmt(bp.get('perplexity'))} ± {_fmt(bp.get('perplexity_se'))}"
            + (f"; zero-shot average {_fmt(bz['avg'], 4)} ± {_fmt(bz['avg_se'], 4)}" if bz else "") + ".", ""]
    for b in budgets:
        out += [f"### {b:.0%} of the decoder parameters", "",
                "| row | removed | perplexity | Δ NLL vs joint-svd | zero-shot avg | compress s "
                "| calib. tokens | units dense / factorised | output error vs SVD (calib.) |",
                "|---|---|---|---|---|---|---|---|---|"]
        ref = by.get((REFERENCE, b))
        for r in row_order:
            p = by.get((r, b))
            if p is None:
                continue
            if "infeasible" in p:
                out.append(f"| {r} | infeasible: {p['infeasible']} | | | | | | | |")
                continue
            d = paired_delta(p, ref)
            z = p.get("zeroshot")
            calib = (f"{p['calib_rel_error_mean']:.3f} vs {p['svd_calib_rel_error_mean']:.3f}"
                     if "calib_rel_error_mean" in p else "—")
            out.append(
                f"| {r} | {p['decoder_reduction']:.2%} | {_fmt(p['perplexity']['perplexity'])} ± "
                f"{_fmt(p['perplexity']['perplexity_se'])} | "
                + ("0 (reference)" if r == REFERENCE else (f"{d[0]:+.4f} ± {d[1]:.4f}" if d else "—")) + " | "
                + _zs_cell(z, bz) + " | "
                f"{p['compress_seconds']:.1f} | {p['calibration_tokens']} | "
                f"{p['units_kept_dense']} / {p['units_factorised']} | {calib} |")
        out.append("")

    # the requirement, decided from the numbers
    out += ["## Best data-free method against the best of the paper's methods (" + ", ".join(PAPER) + ")", ""]
    for b in budgets:
        best = best_at(by, [r for r in data_free if r not in PAPER], b)
        best_ref = best_at(by, PAPER, b)
        if not best or not best_ref:
            out.append(f"* {b:.0%}: not measured yet.")
            continue
        d = paired_delta(best, best_ref)
        verdict = "beats" if d and d[0] + 2 * d[1] < 0 else ("is better than, within 2 s.e. of," if d and d[0] < 0
                                                               else "does NOT beat")
        dense = (base.get("perplexity") or {}).get("perplexity")
        unusable = dense is not None and min(best["perplexity"]["perplexity"],
                                             best_ref["perplexity"]["perplexity"]) > 10 * dense
        out.append(f"* {b:.0%}: best data-free **{best['row']}** (ppl {_fmt(best['perplexity']['perplexity'])}) "
                   f"{verdict} the best paper method **{best_ref['row']}** (ppl "
                   f"{_fmt(best_ref['perplexity']['perplexity'])}): Δ NLL {d[0]:+.4f} ± {d[1]:.4f} (paired s.e.)"
                   + (" — but both are unusable (perplexity above 10x the dense model's)" if unusable else "")
                   + _zs_versus(best, best_ref) + ".")
    out.append("")
    out += _calibration_section(by, budgets, data_free, [r for r in row_order if r not in data_free], bz)
    out += _joint_data_aware_section(by, budgets)
    out += _balanced_section(md_path.parent / "balanced_members.json")
    missing = [f"{r} @ {b:.0%}" for r in rows_meta for b in s["budgets"] if (r, b) not in by]
    out += ["## Not measured", "",
            ("Every row at every budget was measured." if not missing else
             "Cut for lack of compute (each point costs minutes on the shared 2 cores): " + ", ".join(missing) + "."),
            ""]
    zs_done = [f"{p['row']} @ {p['budget']:.0%}" for p in points if "zeroshot" in p]
    n_ppl = sum("perplexity" in p for p in points)
    if len(zs_done) < n_ppl:
        out += [f"Zero-shot (several times the cost of the perplexity probe) was run for {len(zs_done)} of the {n_ppl} measured "
                "points, chosen as the plain joint method, the paper's structures and the best data-free and "
                "data-aware rows by perplexity: " + (", ".join(zs_done) if zs_done else "none") + ".", ""]
    out += NOTES
    md_path.write_text("\n".join(out) + "\n")
    _plot(results, png_path, row_order, budgets, by)


def _log_errors(pts) -> list[list[float]]:
    """Error bars for perplexity on a log axis: exp(mean NLL ± its SE over windows), so they never cross zero."""
    lo, hi = [], []
    for p in pts:
        nll = p["perplexity"]["per_window_nll"]
        se = mean_se(nll)[1] if len(nll) > 1 else 0.0
        ppl = p["perplexity"]["perplexity"]
        lo.append(ppl - math.exp(math.log(ppl) - se))
        hi.append(math.exp(math.log(ppl) + se) - ppl)
    return [lo, hi]


def _plot(results, png_path, row_order, budgets, by) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from research.common import CHANCE

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.2))
    base = results.get("baseline") or {}
    colours = plt.get_cmap("tab20")  # one colour per row, the same in both panels (the default cycle has 10)
    for i, r in enumerate(row_order):
        pts = [by[(r, b)] for b in budgets if (r, b) in by and "perplexity" in by[(r, b)]]
        if not pts:
            continue
        style = "--" if results["settings"]["rows"][r]["method"].split(":")[0] in ("asvd", "svd_llm", "llm_rom") else "-"
        kw = dict(marker="o", ls=style, color=colours(i % 20), capsize=2)
        x = [100 * p["decoder_reduction"] for p in pts]
        ax1.errorbar(x, [p["perplexity"]["perplexity"] for p in pts], yerr=_log_errors(pts), label=r, **kw)
        zs = [p for p in pts if "zeroshot" in p]
        if zs:
            ax2.errorbar([100 * p["decoder_reduction"] for p in zs], [p["zeroshot"]["avg"] for p in zs],
                         yerr=[p["zeroshot"]["avg_se"] for p in zs], **kw)
    if "perplexity" in base:
        ax1.axhline(base["perplexity"]["perplexity"], color="k", lw=0.8, label="dense")
    if "zeroshot" in base:
        ax2.axhline(base["zeroshot"]["avg"], color="k", lw=0.8)
        ax2.text(ax2.get_xlim()[0], base["zeroshot"]["avg"], " dense", va="bottom", fontsize=8)
    tasks = results["settings"]["zeroshot"]["tasks"]
    if all(t in CHANCE for t in tasks):
        chance = sum(CHANCE[t] for t in tasks) / len(tasks)
        ax2.axhline(chance, color="grey", lw=0.8, ls=":")
        ax2.text(ax2.get_xlim()[0], chance, " guessing", va="bottom", fontsize=8, color="grey")
    ax1.set_yscale("log")
    ax1.set_xlabel("decoder parameters removed (%)")
    ax1.set_ylabel("WikiText-2 perplexity (probe windows; log scale)")
    ax2.set_xlabel("decoder parameters removed (%)")
    ax2.set_ylabel("zero-shot average accuracy (seeded subsets)")
    if not any(len(line.get_xdata()) for line in ax2.get_lines()):
        ax2.text(0.5, 0.5, "zero-shot not measured yet", ha="center", transform=ax2.transAxes)
    fig.legend(*ax1.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8)
    fig.suptitle("Gemma-3-270M: methods at equal decoder-parameter reduction (dashed: data-aware)")
    fig.tight_layout(rect=(0, 0, 0.80, 1))
    fig.savefig(png_path, dpi=110)
