"""Scale study: what 10% and 20% of the decoder cost on four real models, 135M to 1.5B parameters.

    python research/bench/scale.py run [--models smollm2-135m,...] [--settings paper,free] [--max-minutes 60]
        # resumable, model by model; --settings paper,free: the cheap data-free points first
    python research/bench/scale.py report     # results/scale.md + scale.json + scale.png from the per-model JSONs

Each model is measured by research/bench/quality.py with that model's protocol (global options forwarded to every
point, one point per process): its own dense baseline, then every setting in SETTINGS at 10% and 20% of the
decoder parameters, perplexity paired per window and zero-shot paired per document against that dense model.
Gemma-3-270M shares its points with results/quality.json. The models are instruct/coder models except Gemma: every
number is relative to the model's own dense baseline, never compared across models in absolute terms.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `research` importable
    sys.path.insert(0, str(REPO))

from research.bench.quality import (BOS, ZS_TASKS, _by, nll_key, paired_nll, ppl_ratio, zs_gain,  # noqa: E402
                                    zs_retention)
from research.bench.quality_report import PRE_GUARDS, sampled_before_guards  # noqa: E402
from research.common import CHANCE  # noqa: E402

OUT_MD, OUT_JSON, OUT_PNG = (REPO / "results" / f"scale.{ext}" for ext in ("md", "json", "png"))
BUDGETS = (0.10, 0.20)
PAPER_CLAIM = 0.988  # the seed paper: 98.80% of zero-shot accuracy kept at 10% fewer parameters (LLaMA-7B)
PAPER_MODEL_PARAMS = 6.74e9  # LLaMA-7B's parameter count (Touvron et al. 2023, arXiv 2302.13971)
# the issue's decode target on the decoder-dominated model, measured by research/bench/inference_speed.py
SPEED_JSON = REPO / "results" / "inference_speed_qwen2.5-coder-1.5b.json"
PROBE_JSON = REPO / "results" / "scale" / "heal_probe.json"  # research/bench/heal_probe.py: distillation step times

# model -> (quality.py global options, results file). The 1.5B model costs ~6x Gemma-3-270M per token on 2 cores:
# bfloat16 evaluation, 16 windows and 100 documents per task there (bfloat16 changed dense perplexity by 0.1% on
# Gemma, results/gemma-3-270m/dtype_check.md).
MODELS = {
    "smollm2-135m": ([], REPO / "results" / "scale" / "smollm2-135m.json"),
    "gemma-3-270m": ([], REPO / "results" / "quality.json"),
    "qwen2.5-coder-0.5b": ([], REPO / "results" / "scale" / "qwen2.5-coder-0.5b.json"),
    "qwen2.5-coder-1.5b": (["--windows", "16", "--zs-limit", "100", "--eval-dtype", "bfloat16"],
                           REPO / "results" / "scale" / "qwen2.5-coder-1.5b.json"),
}

# setting -> the quality.py row at each budget (the best rows of results/quality.md on Gemma-3-270M, on windows
# started with BOS: distillation alone beat refit + distill at 10%, 20% and 30%; loss-aware allocation beat global
# allocation at every budget, healed at 10% by 10.6 paired SE)
_SETTINGS = [  # (key for --settings, label, the row at each budget)
    ("paper", "paper (svd, data-free)", {0.10: "paper/none/none", 0.20: "paper/none/none"}),
    ("free", "best data-free", {0.10: "best-free/none/none", 0.20: "best-free/none/none"}),
    # healed at lr 3e-5: on Gemma-3-270M lr 1e-4 mostly healed windows without BOS (results/heal_zeroshot.md)
    ("self", "best without user data (self-generated, healed)", {0.10: "loss-svd_llm/self/distill-lr3e-5",
                                                                0.20: "loss-llm_rom/self/distill-lr3e-5"}),
    ("c4", "best with user data (C4, healed)", {0.10: "loss-svd_llm/c4/distill-lr3e-5",
                                                0.20: "loss-llm_rom/c4/distill-lr3e-5"}),
]
SETTINGS = {label: rows_at for _, label, rows_at in _SETTINGS}
SETTING_KEYS = {key: label for key, label, _ in _SETTINGS}
PAPER = SETTING_KEYS["paper"]  # the seed paper's structure: what the other settings are read against


def quality_cmd(model: str) -> list[str]:
    options, results = MODELS[model]
    return [sys.executable, str(REPO / "research" / "bench" / "quality.py"), "--model", model,
            "--results", str(results), *options]


def cmd_run(args) -> int:
    """Model by model, cheapest first: the dense baseline and every setting, perplexity and zero-shot together."""
    models = args.models.split(",") if args.models else list(MODELS)
    for model in models:
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}: one of {', '.join(MODELS)}")
    keys = args.settings.split(",") if args.settings else list(SETTING_KEYS)
    for key in keys:
        if key not in SETTING_KEYS:
            raise SystemExit(f"unknown setting {key!r}: one of {', '.join(SETTING_KEYS)}")
    try:
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(BUDGETS)
    except ValueError:
        budgets = [None]
    if any(b not in BUDGETS for b in budgets):
        raise SystemExit(f"--budgets {args.budgets!r}: a comma-separated choice of {', '.join(map(str, BUDGETS))}")
    for model in models:
        MODELS[model][1].parent.mkdir(parents=True, exist_ok=True)
        # the dense baseline first, perplexity and zero-shot: every later point's retention reads as soon as it
        # lands (a stop mid-run leaves readable points, not ones waiting for dense)
        for command in (["run"], ["zeroshot", "--dense"]):
            code = subprocess.call(quality_cmd(model) + command + ["--only", "",
                                                                   "--max-minutes", str(args.max_minutes)])
            if code:
                return code
        # perplexity and zero-shot of new points; then zero-shot for points measured before it was asked for
        # (Gemma's, from quality.json); then the windows started with BOS for points measured before quality.py
        # scored them (rebuilt and checked to be the measured model)
        for command in (["run", "--zeroshot"], ["zeroshot", "--dense"], ["bos", "--dense"]):
            for budget in budgets:
                rows = ",".join(SETTINGS[SETTING_KEYS[key]][budget] for key in keys)
                code = subprocess.call(quality_cmd(model) + command + ["--budgets", str(budget), "--only", rows,
                                                                       "--max-minutes", str(args.max_minutes)])
                if code:
                    return code
    return 0


def params_of(points: dict) -> tuple[int, int] | None:
    """(total, decoder) parameters of the dense model, from any compressed point (only the decoder changes)."""
    for p in points.values():
        if "params_decoder_before" in p:
            before, after = p["params_decoder_before"], p["params_decoder_after"]
            return p.get("params_total_after_heal", p["params_total_after"]) + before - after, before
    return None


def collect() -> dict:
    """One record per model × setting × budget, with the ratios against that model's dense baseline."""
    out = {"models": {}, "points": []}
    for model, (options, path) in MODELS.items():
        results = json.loads(path.read_text()) if path.is_file() else {"points": []}
        by = _by(results)  # the measured points
        failures = {(p["row"], p["budget"]): p for p in results["points"] if "perplexity" not in p}
        dense = by.get(("dense", 0.0))
        # a task dense does no better than guessing on measures nothing compression can lose: a damaged model
        # drifting to one answer can gain there (BoolQ's majority is "yes", 62%)
        at_chance = tasks_at_chance(dense["zeroshot"]["acc"]) if dense and dense.get("zeroshot") else []
        sizes = params_of(by)
        study = [dense]
        for setting, rows_at in SETTINGS.items():
            for budget in BUDGETS:
                p = by.get((rows_at[budget], budget))
                rec = {"model": model, "setting": setting, "budget": budget, "row": rows_at[budget]}
                failed = failures.get((rows_at[budget], budget))  # on record with its error; `run` tries again
                if p is None and failed is not None:
                    rec["error"] = failed.get("error", "no perplexity").strip().splitlines()[-1][-200:]
                study.append(p)
                if p and dense:
                    rec["removed"] = p["decoder_reduction"]
                    if sampled_before_guards(p):
                        rec["self_text_before_guards"] = True
                    rec["ppl_ratio"], rec["ppl_ratio_se"] = ppl_ratio(p, dense)
                    rec["ppl_windows_bos"] = nll_key(p, dense) == BOS  # else the standard windows, without BOS
                    r = zs_retention(p, dense)
                    if r:
                        rec["retention"], rec["retention_se"] = r
                        rec["task_acc"] = {t: p["zeroshot"]["acc"][t] for t in ZS_TASKS}
                        rec["above_chance"], rec["above_chance_se"] = above_chance(r, dense)
                    # what calibration + healing bought over the paper's structure and over the best data-free
                    # build, paired per document
                    for name, base_setting in (("paper", PAPER), ("free", SETTING_KEYS["free"])):
                        base = by.get((SETTINGS[base_setting][budget], budget))
                        gain = zs_gain(p, base, dense) if is_healed(p["row"]) and base else None
                        if not gain:
                            continue
                        rec[f"gain_over_{name}"], rec[f"gain_over_{name}_se"] = gain
                        if at_chance:
                            rec["tasks_dense_at_chance"] = at_chance
                            (rec[f"gain_over_{name}_above_chance_tasks"],
                             rec[f"gain_over_{name}_above_chance_tasks_se"]) = zs_gain(
                                p, base, dense, [t for t in ZS_TASKS if t not in at_chance])
                    self_ = setting == SETTING_KEYS["self"]
                    c4 = by.get((SETTINGS[SETTING_KEYS["c4"]][budget], budget)) if self_ else None
                    if c4:  # self-generated against C4: the same structure and healing, other calibration
                        rec["nll_vs_c4"], rec["nll_vs_c4_se"] = paired_nll(p, c4)
                        rec["nll_vs_c4_bos"] = nll_key(p, c4) == BOS
                        vs = zs_gain(p, c4, dense)
                        if vs:
                            rec["zs_vs_c4"], rec["zs_vs_c4_se"] = vs
                    before = next((e for e in reversed(p.get("earlier", [])) if sampled_before_guards(e)), None)
                    guarded = zs_gain(p, before, dense) if "self_text" in p and before else None
                    if guarded:  # rebuilt on text sampled with the loop guards: what they changed, paired per document
                        rec["gain_over_text_before_guards"], rec["gain_over_text_before_guards_se"] = guarded
                        rec["ppl_ratio_text_before_guards"] = ppl_ratio(before, dense)[0]
                out["points"].append(rec)
        # what a point costs on this model, measured apart for data-free and healed points: building it (compress,
        # and calibrate + heal) with its perplexity, and its zero-shot (often added by a later command). Before any
        # compressed point, the dense baseline's evaluation stands in for the data-free cost (a lower bound).
        measured = [p for p in study[1:] if p]
        free = [p for p in measured if not is_healed(p["row"])] or ([dense] if dense else [])
        out["models"][model] = {
            "results": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path), "options": options,
            "params_total": sizes[0] if sizes else None, "params_decoder": sizes[1] if sizes else None,
            "dense_perplexity": dense["perplexity"]["perplexity"] if dense else None,
            "dense_zeroshot": dense["zeroshot"]["avg"] if dense and dense.get("zeroshot") else None,
            "dense_task_acc": ({t: dense["zeroshot"]["acc"][t] for t in ZS_TASKS}
                               if dense and dense.get("zeroshot") else None),
            "minutes": {"data-free": _minutes(free), "healed": _minutes([p for p in measured if is_healed(p["row"])])}}
    return out


def tasks_at_chance(task_acc: dict) -> list[str]:
    """The tasks a model scores no better than guessing on: accuracy at most 1/choices."""
    return [t for t in ZS_TASKS if task_acc[t] <= CHANCE[t]]


def is_healed(row: str) -> bool:
    """A quality.py row is structure/calibration/heal: healed unless its heal part is none."""
    return row.split("/")[-1] != "none"


def _minutes(points: list[dict]) -> list[float | None]:
    """[build + perplexity, zero-shot]: median minutes over the points that measured each (None: none did). A point
    whose distillation resumed from a saved state timed only part of its build: left out of the build median."""
    built = [p.get("build_wall_seconds", 0.0) + p["perplexity"]["seconds"] for p in points
             if not p.get("heal_resumed_from_step")]
    zeroshot = [p["zeroshot"]["seconds"] for p in points if p.get("zeroshot")]
    return [statistics.median(built) / 60 if built else None, statistics.median(zeroshot) / 60 if zeroshot else None]


REFERENCE_MODEL = "gemma-3-270m"  # where healed points were measured first: the others' estimates scale from it


def compute_needed(data: dict, probe: dict) -> list[dict]:
    """Per model, the minutes the points not measured yet would take, from what was measured there: data-free points
    at that model's median; healed ones at its own median where one was measured, else at the reference model's
    extra cost of healing (its healed median minus its data-free median, build + perplexity) scaled by the ratio of
    the two models' distillation step times (heal_probe.json), on top of this model's data-free cost. Rough by
    construction (calibration and loss-aware allocation scale with a forward, distillation with a forward and a
    backward). A point whose cost needs a measurement that is missing is counted in `not_estimated` instead."""
    ref = data["models"][REFERENCE_MODEL]["minutes"]
    out = []
    for model, m in data["models"].items():
        minutes, how, unknown = 0.0, set(), 0
        free_build, zs = m["minutes"]["data-free"]
        todo = [p for p in data["points"] if p["model"] == model and "retention" not in p]
        if m["dense_zeroshot"] is None:  # dense's zero-shot costs what a point's does
            if zs is None:
                unknown += 1
            else:
                minutes += zs
        for p in todo:
            build = None
            if "ppl_ratio" in p:
                build = 0.0  # only its zero-shot is missing
            elif not is_healed(p["row"]):
                build = free_build
            elif m["minutes"]["healed"][0] is not None:
                build = m["minutes"]["healed"][0]
            elif model in probe and REFERENCE_MODEL in probe and None not in (ref["healed"][0], free_build):
                ratio = probe[model]["seconds_per_step"] / probe[REFERENCE_MODEL]["seconds_per_step"]
                build = free_build + (ref["healed"][0] - ref["data-free"][0]) * ratio
                how.add(f"healed points scaled from {REFERENCE_MODEL} by distillation step time x{ratio:.1f}")
            if build is None or zs is None:
                unknown += 1
                continue
            minutes += build + zs
        out.append({"model": model, "points": len(todo), "minutes": minutes, "not_estimated": unknown,
                    "how": sorted(how), "distill_peak_rss_gib": probe.get(model, {}).get("distill_peak_rss_gib")})
    return out


def above_chance(retention: tuple[float, float], dense: dict) -> tuple[float, float]:
    """What share of dense's accuracy *above guessing* a point keeps: (acc - chance) / (dense - chance), the chance
    level being the average of the tasks' (1/choices). A small model scores near chance, so its plain retention
    (acc / dense) looks high even when the compressed model only guesses (SmolLM2-135M: 0.43 dense, chance 0.36)."""
    chance = sum(CHANCE[t] for t in ZS_TASKS) / len(ZS_TASKS)
    dense_avg = dense["zeroshot"]["avg"]
    ratio, se = retention
    return (ratio * dense_avg - chance) / (dense_avg - chance), se * dense_avg / (dense_avg - chance)


def verdict(data: dict) -> list[str]:
    lines = []
    for setting in SETTINGS:
        pts = [p for p in data["points"] if p["setting"] == setting and p["budget"] == 0.10 and "retention" in p]
        if not pts:
            lines.append(f"* {setting}, 10%: zero-shot retention not measured on any model yet.")
            continue
        held = [p["model"] for p in pts if p["retention"] - 2 * p["retention_se"] >= PAPER_CLAIM]
        within = [p["model"] for p in pts if p["retention"] + 2 * p["retention_se"] >= PAPER_CLAIM]
        fits = dict.fromkeys([extrapolation(data, pts), extrapolation(data, pts, "above_chance")])  # once if same
        lines.append(f"* {setting}, 10%: the paper's {PAPER_CLAIM:.1%} retention holds (beyond 2 SE) on "
                     f"{', '.join(held) or 'none'} of the {len(pts)} model{'s' * (len(pts) != 1)} measured; within "
                     f"2 SE of it on {', '.join(within) or 'none'}. {' '.join(fits)}")
    return (lines + share_verdict(data) + healing_verdict(data) + healing_verdict(data, "free")
            + calibration_verdict(data) + chance_verdict(data))


def share_verdict(data: dict) -> list[str]:
    """What a budget of the decoder is of each whole model: the fits above are against model size at the same
    share of the decoder, which is a larger share of a model whose decoder holds more of it."""
    shares = [(m, d["params_decoder"] / d["params_total"]) for m, d in data["models"].items()
              if d.get("params_decoder") and d.get("params_total")]
    if not shares:
        return []
    return [f"* {budget:.0%} of the decoder is " + ", ".join(f"{budget * s:.1%} of {m}'s parameters" for m, s in shares)
            + ": one decoder budget removes a different share of each model (the embedding and head lie outside "
            "it), so the fits above compare models at unequal shares of their whole."
            for budget in BUDGETS]


def calibration_verdict(data: dict) -> list[str]:
    """Self-generated text against C4 as calibration and healing data, model by model (the same structure and
    distillation): the perplexity difference paired per window, the zero-shot difference paired per document."""
    lines = []
    for budget in BUDGETS:
        pts = [p for p in data["points"] if p["setting"] == SETTING_KEYS["self"] and p["budget"] == budget
               and "nll_vs_c4" in p]
        if not pts:
            continue
        each = []
        for p in pts:
            d, se = p["nll_vs_c4"], p["nll_vs_c4_se"]
            which = "within 2 SE" if abs(d) <= 2 * se else ("self-generated better" if d < 0 else "C4 better")
            text = (f"{p['model']} {d:+.3f} ± {se:.3f} nats per token ({which}; perplexity self / C4 "
                    f"{math.exp(d):.2f}x{'' if p['nll_vs_c4_bos'] else ', windows without BOS'})")
            if "zs_vs_c4" in p:
                z, zse = p["zs_vs_c4"], p["zs_vs_c4_se"]
                text += (f", zero-shot {100 * z:+.1f} ± {100 * zse:.1f} points"
                         + (" (within 2 SE of 0)" if abs(z) <= 2 * zse else ""))
            if p.get("self_text_before_guards"):
                text += " (self-generated text sampled before the loop guards)"
            each.append(text)
        self_row, c4_row = SETTINGS[SETTING_KEYS["self"]][budget], SETTINGS[SETTING_KEYS["c4"]][budget]
        lines.append(f"* self-generated against C4 calibration, {budget:.0%} (`{self_row}` against `{c4_row}`): "
                     f"{'; '.join(each)}: self minus C4, "
                     "perplexity paired per window, zero-shot per document.")
    return lines


def healing_verdict(data: dict, against: str = "paper") -> list[str]:
    """What each healed setting keeps beyond a data-free setting at the same budget (`against`: "paper", the paper's
    structure, or "free", the best data-free build), model by model: the gain in zero-shot retention paired per
    document (a gain beyond 2 SE is one the documents show, not noise)."""
    base_setting = SETTING_KEYS[against]
    base_name = {"paper": "the paper's structure", "free": "the best data-free build"}[against]
    key = f"gain_over_{against}"
    lines = []
    for setting in [s for s, rows_at in SETTINGS.items() if is_healed(rows_at[BUDGETS[0]])]:
        for budget in BUDGETS:
            pts = [p for p in data["points"] if p["setting"] == setting and p["budget"] == budget and key in p]
            if not pts:
                continue
            base = {p["model"]: p for p in data["points"] if p["setting"] == base_setting and p["budget"] == budget}
            each = [f"{p['model']} {100 * p[key]:+.1f} ± {100 * p[key + '_se']:.1f}"
                    + ("" if abs(p[key]) > 2 * p[key + "_se"] else " (within 2 SE of 0)")
                    + f" (perplexity / dense {_ppl(base[p['model']])} → {_ppl(p)})"
                    + (" (healed on self-generated text sampled before the loop guards)"
                       if p.get("self_text_before_guards") else "")
                    + (f" (without {', '.join(p['tasks_dense_at_chance'])}, where dense scores no better than "
                       f"chance: {100 * p[key + '_above_chance_tasks']:+.1f} ± "
                       f"{100 * p[key + '_above_chance_tasks_se']:.1f})"
                       if key + "_above_chance_tasks" in p else "")
                    + (f" (rebuilt on text sampled with the loop guards: {100 * p['gain_over_text_before_guards']:+.1f}"
                       f" ± {100 * p['gain_over_text_before_guards_se']:.1f} points against the same row on the text "
                       f"sampled before them, at {p['ppl_ratio_text_before_guards']:.2f}x dense perplexity)"
                       if against == "paper" and "gain_over_text_before_guards" in p else "")
                    for p in pts]
            lines.append(f"* {setting}, {budget:.0%}, against {base_name} at the same budget: "
                         f"{'; '.join(each)}: points of dense zero-shot accuracy kept beyond {base_name}, "
                         "paired per document.")
    return lines


def _ppl(rec: dict) -> str:
    return f"{rec['ppl_ratio']:.2f}x" + ("" if rec["ppl_windows_bos"] else " without BOS")


def chance_verdict(data: dict) -> list[str]:
    """Whether the paper's structure leaves each model guessing: on Gemma-3-270M (REPORT.md's Table 1 analogue) its
    zero-shot at 10% and 20% is at chance level; a model is *at chance* where the share of accuracy above guessing
    it keeps is within 2 SE of 0, *above chance* where beyond. Where models differ, the Gemma verdict is Gemma's."""
    setting = PAPER
    lines = []
    for budget in BUDGETS:
        pts = [p for p in data["points"] if p["setting"] == setting and p["budget"] == budget and "above_chance" in p]
        if not pts:
            continue
        at = [p["model"] for p in pts if p["above_chance"] - 2 * p["above_chance_se"] <= 0]
        above = [f"{p['model']} ({100 * p['above_chance']:.0f}% ± {100 * p['above_chance_se']:.0f})"
                 for p in pts if p["above_chance"] - 2 * p["above_chance_se"] > 0]
        lines.append(f"* {setting}, {budget:.0%}: zero-shot at chance level (the share above guessing kept within 2 "
                     f"SE of 0) on {', '.join(at) or 'none'}; above chance on {', '.join(above) or 'none'}"
                     + (" — the Gemma-3-270M verdict that it leaves the model guessing does not hold on every model."
                        if at and above else "."))
    return lines


MIN_MODELS_TO_EXTRAPOLATE = 3


def extrapolation(data: dict, pts: list[dict], key: str = "retention") -> str:
    """Where a power law through the measured losses reaches the paper's: log(1 - p[key]) fitted against
    log(parameters) by least squares, weighted by each point's SE (propagated to the log), solved for a loss of
    1 - PAPER_CLAIM. A power law is how pruning studies find loss falling with size (SliceGPT, arXiv 2401.15024);
    four models of three families, instruct and base, say little beyond their own range: read it as a direction.
    key "retention": the share of accuracy lost, as the paper counts it. A model near chance cannot lose more than
    its small margin above guessing, which flattens that fit; key "above_chance" fits the share of the accuracy
    above guessing lost instead (and asks the same 1.2% of it: stricter than the paper's claim)."""
    fit = [(data["models"][p["model"]]["params_total"], 1 - p[key], p[f"{key}_se"]) for p in pts]
    fit = [(n, loss, se) for n, loss, se in fit if n]
    what = "loss" if key == "retention" else "loss of the share above chance"
    if len(fit) < MIN_MODELS_TO_EXTRAPOLATE:
        return f"(No extrapolation before {MIN_MODELS_TO_EXTRAPOLATE} models are measured.)"
    if any(loss <= 0 for _, loss, _ in fit):
        return f"(No extrapolation of the {what}: a model lost nothing measurable.)"
    x = [math.log10(n) for n, _, _ in fit]
    y = [math.log10(loss) for _, loss, _ in fit]
    w = [(loss / max(se, 1e-6)) ** 2 for _, loss, se in fit]  # 1 / var(log10 loss), up to a constant
    sw = sum(w)
    mx, my = sum(wi * xi for wi, xi in zip(w, x)) / sw, sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    slope = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y)) / sxx
    if slope >= 0:
        return (f"(The {what} does not fall with size across these {len(fit)} models (fitted exponent "
                f"{slope:+.2f}): no size at which the claim would start to hold can be read from them.)")
    at = 10 ** (mx + (math.log10(1 - PAPER_CLAIM) - my) / slope)
    at_paper = 10 ** (my + slope * (math.log10(PAPER_MODEL_PARAMS) - mx))
    return (f"(A power law through the {len(fit)} models, {what} ∝ N^{slope:.2f}, reaches "
            f"{1 - PAPER_CLAIM:.1%} at about {at:.2g} parameters; at LLaMA-7B's size it predicts a loss of "
            f"{at_paper:.1%}.)")


def targets(data: dict, speed: dict | None) -> list[dict]:
    """Machine-readable verdicts: for each model and setting at 10%, whether the paper's retention holds (point
    estimate, SE beside it; None where zero-shot is not measured yet), then the decode target of the inference bench
    on the 1.5B model as that bench recorded it."""
    out = []
    for p in data["points"]:
        if p["budget"] != 0.10:
            continue
        r = p.get("retention")
        out.append({"name": f"{p['model']}, {p['setting']}, 10%: zero-shot retention (the paper's claim)",
                    "measured": r, "se": p.get("retention_se"), "target": f">= {PAPER_CLAIM}",
                    "met": r is not None and r >= PAPER_CLAIM})
    for t in (speed or {}).get("targets", []):
        if t["target"].startswith("decode"):
            out.append({"name": f"qwen2.5-coder-1.5b {t['model']} {t['dtype']}: {t['target']}",
                        "measured": t["value"], "target": t["target"], "met": t["met"],
                        "source": str(SPEED_JSON.relative_to(REPO))})
    return out


def _f(x, fmt):
    return "—" if x is None else format(x, fmt)


def per_task_tables(data: dict) -> list[str]:
    """Accuracy per task, per model: where an average moves because one task swung (a damaged model drifting to
    BoolQ's majority answer), this shows it."""
    lines = ["## Zero-shot accuracy per task", "",
             "Accuracy in % on the same documents as the retention above; *(chance)* marks a task this dense model "
             "scores no better than guessing on (1/choices, in the header), where a compressed model's gain or loss "
             "measures nothing it kept.", ""]
    for model, m in data["models"].items():
        dense = m.get("dense_task_acc")
        if not dense:
            continue
        at_chance = tasks_at_chance(dense)
        lines += [f"**{model}**", "", "| setting | budget | " + " | ".join(
                      f"{t} ({CHANCE[t]:.0%})" for t in ZS_TASKS) + " | average |",
                  "|---|---|" + "---|" * (len(ZS_TASKS) + 1),
                  "| dense | - | " + " | ".join(f"{100 * dense[t]:.1f}" + (" (chance)" if t in at_chance else "")
                                               for t in ZS_TASKS) + f" | {100 * m['dense_zeroshot']:.1f} |"]
        for p in data["points"]:
            if p["model"] == model and "task_acc" in p:
                acc = p["task_acc"]
                mark = " †" if p.get("self_text_before_guards") else ""
                lines.append(f"| {p['setting']}{mark} | {p['budget']:.0%} | " + " | ".join(
                    f"{100 * acc[t]:.1f}" for t in ZS_TASKS) + f" | {100 * sum(acc.values()) / len(acc):.1f} |")
        lines.append("")
    return lines


def cmd_report(args) -> int:
    from research.common import write_json

    data = collect()
    data["targets"] = targets(data, json.loads(SPEED_JSON.read_text()) if SPEED_JSON.is_file() else None)
    data["verdict"] = verdict(data)  # results/REPORT.md copies these lines
    data["compute_needed"] = compute_needed(data, json.loads(PROBE_JSON.read_text()) if PROBE_JSON.is_file() else {})
    write_json(OUT_JSON, data)
    lines = ["# Scale study: what 10% and 20% of the decoder cost, 135M to 1.5B parameters", "",
             "Generated by `python research/bench/scale.py report` from the per-model results that "
             "`python research/bench/scale.py run` wrote (each point measured by `research/bench/quality.py`, one "
             "per process, resumable). Do not edit by hand.", "",
             "**Warning:** a perplexity ratio marked *no BOS* is on WikiText-2 windows that start mid-text without "
             "BOS (the GPTQ/SVD-LLM protocol; points measured before quality.py also scored the windows started with "
             "BOS). On Gemma-3-270M that flatters healed rows badly (results/quality.md's warning, measured in "
             "results/heal_zeroshot.md): read such ratios as unverified and zero-shot retention (evaluated with BOS) "
             "as the measure. Healed rows use distillation at lr 3e-5 (the tool's default since lr 1e-4 was found to "
             "heal mostly the BOS-less windows).",
             "",
             "Protocol: as results/quality.md — WikiText-2 test perplexity on seeded 512-token windows, paired per "
             f"window against the model's own dense baseline; zero-shot on {', '.join(ZS_TASKS)}, nested seeded "
             "documents, paired per document. Exceptions per model are in the table. The models are instruct or "
             "coder models except Gemma-3-270M (base): only ratios against each model's own dense baseline are "
             "compared, never absolute numbers across models.", "",
             "| model | parameters | decoder share | protocol | dense perplexity | dense zero-shot | "
             "minutes per point, measured medians: build + perplexity, + zero-shot |",
             "|---|---|---|---|---|---|---|"]
    for model, m in data["models"].items():
        share = m["params_decoder"] / m["params_total"] if m["params_total"] else None
        cost = "; ".join(f"{kind} {_f(b, '.1f')} + {_f(z, '.1f')}" for kind, (b, z) in m["minutes"].items())
        lines.append(f"| {model} | {_f(m['params_total'], ',')} | {_f(share, '.0%')} | "
                     f"{' '.join(m['options']) or 'full (32 windows, 250 documents, float32)'} | "
                     f"{_f(m['dense_perplexity'], '.3f')} | {_f(m['dense_zeroshot'], '.4f')} | {cost} |")
    lines += ["", "## Results", "", "| setting | budget | " + " | ".join(data["models"]) + " |",
              "|---|---|" + "---|" * len(data["models"])]
    for setting in SETTINGS:
        for budget in BUDGETS:
            cells = []
            for model in data["models"]:
                p = next(q for q in data["points"] if q["model"] == model and q["setting"] == setting
                         and q["budget"] == budget)
                if "ppl_ratio" not in p:
                    cells.append(f"failed ({p['error']})" if "error" in p else "not measured")
                    continue
                z = (f"{100 * p['retention']:.1f}% ± {100 * p['retention_se']:.1f} ({100 * p['above_chance']:.0f}% "
                     f"± {100 * p['above_chance_se']:.0f} above chance)" if "retention" in p
                     else "zero-shot not measured")
                cells.append(f"ppl {p['ppl_ratio']:.2f}x ± {p['ppl_ratio_se']:.2f}"
                             f"{'' if p.get('ppl_windows_bos') else ' (no BOS)'}; {z}"
                             + (" †" if p.get("self_text_before_guards") else ""))
            lines.append(f"| {setting} | {budget:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: perplexity / dense ± paired SE, on the windows each started with BOS where both were "
              "measured so, else on the standard windows (marked no BOS); zero-shot retention (average accuracy / "
              "dense) ± paired SE, and in brackets the share of dense's accuracy above guessing kept, (accuracy - "
              "chance) / (dense - chance), chance being the tasks' average 1/choices: near 0% the compressed model "
              "only guesses. Rows: " + "; ".join(f"{s} = `{r[0.10]}` at 10%, `{r[0.20]}` at 20%"
                                               for s, r in SETTINGS.items()) + ". `best-free` at 20% allocates "
              "globally with the residual prior on Gemma-3-270M and with the flat prior on the others (the residual "
              "prior reads norms after each block, which the Llama and Qwen2 families lack). Where the paper's 10% "
              "structure (separate Q and K) cannot remove 10% of the decoder (the Qwen2.5-Coder models: grouped-query "
              "attention beside a wide MLP), `paper` and `best-free` at 10% use their 20% structure (paper-20; all "
              "groups, balanced) at the 10% target; each point records what was changed (`config_changed`).",
              *(["", f"† {PRE_GUARDS}"] if any(p.get("self_text_before_guards") for p in data["points"]) else []),
              "",
              "## Verdict", "", *(data["verdict"] or ["* No zero-shot points yet."]),
              *(f"* {t['name']}: {t['measured']:.3f}x, {'met' if t['met'] else '**not met**'} ({t['source']})"
                for t in data["targets"] if "source" in t),
              "", "![zero-shot retention, the share above chance kept and the perplexity ratio against model size]"
              "(scale.png)", "", *per_task_tables(data)]
    missing = [p for p in data["points"] if "ppl_ratio" not in p]
    if missing:
        lines += ["## Not measured yet", "", f"{len(missing)} of {len(data['points'])} model × setting × budget "
                  "points: " + ", ".join(f"{p['model']} {p['row']} @ {p['budget']:.0%}" for p in missing) + ".",
                  "`python research/bench/scale.py run` continues where it stopped; `--settings paper,free` measures "
                  "the data-free points (no calibration, no healing) on every model before the healed ones.", "",
                  "### Compute still needed (estimated from what was measured)", "",
                  "| model | points without zero-shot | estimated minutes | not estimated | distillation peak RSS GiB "
                  "(heal_probe.json) | how |", "|---|---|---|---|---|---|"]
        for c in data["compute_needed"]:
            lines.append(f"| {c['model']} | {c['points']} | {c['minutes']:,.0f} | {c['not_estimated']} | "
                         f"{_f(c['distill_peak_rss_gib'], '.1f')} | {'; '.join(c['how']) or 'measured medians'} |")
        lines += ["", f"Total: about {sum(c['minutes'] for c in data['compute_needed']) / 60:,.1f} hours on this "
                  "machine, one point at a time. Each point at this model's measured medians (table above); before a "
                  "model has a compressed point its dense evaluation stands in (a lower bound); healed points on a "
                  f"model with none measured: {REFERENCE_MODEL}'s extra cost of healing scaled by the ratio of "
                  "distillation step times that `python research/bench/heal_probe.py` measured (a few steps per "
                  "model), a rough estimate. A point that failed counts as not measured.", ""]
    OUT_MD.write_text("\n".join(lines) + "\n")
    _plot(data)
    print(f"wrote {OUT_MD.relative_to(REPO)}, {OUT_JSON.name} and {OUT_PNG.name}")
    return 0


def _plot(data: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for i, setting in enumerate(SETTINGS):
        for budget, style in zip(BUDGETS, ("-o", "--s")):
            color = f"C{i}"  # one colour per setting on both panels (the legend is drawn on one), style per budget
            pts = [(data["models"][p["model"]]["params_total"], p) for p in data["points"]
                   if p["setting"] == setting and p["budget"] == budget and "ppl_ratio" in p]
            pts.sort(key=lambda x: x[0])
            if not pts:
                continue
            label = f"{setting}, {budget:.0%}"
            zs = [(n, p) for n, p in pts if "retention" in p]
            if zs:
                for ax, key in zip(axes, ("retention", "above_chance")):
                    ax.errorbar([n for n, _ in zs], [100 * p[key] for _, p in zs],
                                yerr=[200 * p[f"{key}_se"] for _, p in zs], fmt=style, color=color, capsize=3,
                                label=label)
            axes[2].errorbar([n for n, _ in pts], [p["ppl_ratio"] for _, p in pts],
                             yerr=[2 * p["ppl_ratio_se"] for _, p in pts], fmt=style, color=color, capsize=3,
                             label=label)
    axes[0].axhline(100 * PAPER_CLAIM, color="grey", lw=0.8, ls=":")
    axes[0].set(xscale="log", xlabel="parameters (dense)", ylabel="zero-shot retention, % of dense (± 2 SE)")
    axes[1].axhline(0, color="grey", lw=0.8, ls=":")  # guessing
    axes[1].set(xscale="log", xlabel="parameters (dense)",
                ylabel="accuracy above chance kept, % of dense's (± 2 SE)")
    axes[2].set(xscale="log", yscale="log", xlabel="parameters (dense)", ylabel="perplexity / dense (± 2 SE)")
    # one tick per model at its size, the same range on both panels whether or not a model is measured yet
    sizes = {m: v["params_total"] for m, v in data["models"].items() if v["params_total"]}
    if sizes:
        for ax in axes:
            ax.minorticks_off()
            ax.set_xticks(list(sizes.values()), [f"{m}\n{n / 1e6:,.0f}M" for m, n in sizes.items()], fontsize=7)
            ax.set_xlim(min(sizes.values()) / 1.3, max(sizes.values()) * 1.3)
    handles, labels = axes[2].get_legend_handles_labels()  # below the panels: inside one it hides points
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(OUT_PNG, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="measure, model by model (resumable)")
    run.add_argument("--models", default="", help=f"comma-separated, default all: {','.join(MODELS)}")
    run.add_argument("--settings", default="", help="comma-separated, default all: "
                     + ", ".join(f"{key} ({label})" for key, label in SETTING_KEYS.items())
                     + "; e.g. the cheap data-free points on every model first: --settings paper,free")
    run.add_argument("--budgets", default="", help="comma-separated, default all: " + ",".join(map(str, BUDGETS))
                     + "; e.g. every model's 10%% points before any 20%% one: --budgets 0.1")
    run.add_argument("--max-minutes", type=float, default=600.0, help="start no new point after this long")
    run.set_defaults(func=cmd_run)
    sub.add_parser("report").set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
