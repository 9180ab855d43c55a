"""results/REPORT.md, generated from results/experiments/*/*.json: every number is read from a result file, next to
the command that wrote it. Verdicts follow fixed rules stated in the text (a difference "holds" only beyond 2 standard
errors), so rerunning an experiment rewrites its verdict too.

    python -m research.experiments experiment report [--results results]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..common import CHANCE
from .common import RUN

TITLE = "# Reproducing arXiv 2402.16319 (data-free joint rank-k) on a model you can run"


def write(results: Path = Path("results")) -> Path:
    results = Path(results)
    exp = results / "experiments"
    sections = [_intro(exp)]
    for fn in (_table1, _joint_vs_separate, _layers, _denoise, _watermark, _spectra, _activations):
        try:
            sections.append(fn(exp))
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as exc:  # an old or partial file: say so
            sections.append(f"## {fn.__name__.strip('_')}\n\n**could not be rendered**: {type(exc).__name__}: {exc}\n")
    sections.insert(1, _summary(sections[1:], _models(exp), _scale_verdicts(results / "scale.json")))
    path = results / "REPORT.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(sections), encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------------------


def _models(exp: Path) -> list[str]:
    """The models the experiments' results were measured on (each result file names its model)."""
    import json

    found = set()
    for f in exp.glob("*/*.json"):
        try:
            model = json.loads(f.read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(model, str):
            found.add(model)
    return sorted(found)


def _scale_verdicts(path: Path) -> list[str]:
    """The scale study's verdict lines as results/scale.json recorded them (written by scale.py report)."""
    try:
        return list(json.loads(path.read_text()).get("verdict") or [])
    except (OSError, ValueError, AttributeError):
        return []


def _summary(sections: list[str], models: list[str] | None = None, scale: list[str] | None = None) -> str:
    """The verdict lines of every section, gathered at the top (copied from the sections, never retyped)."""
    out = ["## Summary of verdicts", ""]
    if models:
        out += [f"Every verdict below holds for the model the experiments ran on: {', '.join(models)}. Small models "
                "degrade more than large ones at the same reduction (SliceGPT, arXiv 2401.15024); the scale study "
                "(`research/bench/scale.py`, results/scale.md) measures the paper's settings on three more "
                "models, 135M to 1.5B parameters.", ""]
    if scale:
        out += ["What the scale study says (copied from results/scale.json; its cells, with the share of accuracy "
                "above guessing, and any point not measured yet are in results/scale.md):", "", *scale, ""]
    for text in sections:
        lines = text.splitlines()
        title = next((l[3:] for l in lines if l.startswith("## ")), "?")
        verdicts, inside, seen, sub = [], False, False, None
        for line in lines:
            if line.startswith("### "):
                sub = line[4:]
            if line.startswith("**Verdict"):
                inside, seen = True, False
                rest = line.split("**", 2)[-1].strip()
                if rest.startswith("("):  # "(paper: ...): verdict" -> keep the verdict after the claim
                    depth, cut = 0, None
                    for i, ch in enumerate(rest):
                        depth += ch == "("
                        depth -= ch == ")"
                        if depth == 0:
                            cut = i + 1
                            break
                    rest = rest[cut:] if cut else ""
                rest = rest.lstrip(": ").strip()
                if rest:
                    verdicts.append(f"  - {rest}")
                continue
            if inside and line.startswith("- "):
                seen = True
                verdicts.append(f"  - {sub + ': ' if sub else ''}{line[2:]}")
            elif inside and seen and not line.strip():
                inside = False
        if "**not run**" in text and not verdicts:
            verdicts.append("  - not run (see the section)")
        out.append(f"- **{title}**")
        out += verdicts or ["  - no verdict"]
    return "\n".join(out) + "\n"


def _load(exp: Path, name: str) -> list[tuple[Path, dict]]:
    d = exp / name
    if not d.is_dir():
        return []
    return [(p, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(d.glob("*.json"))]


def _rel(exp: Path, path: Path) -> str:
    return str(path.relative_to(exp.parent))


def _cmd(r: dict) -> str:
    m = r["meta"]
    return (f"```\n{m['command']}\n```\n*({m['wall_time_s']:.0f} s, {m['threads']} threads, "
            f"finished {m['finished_utc']}, jointrank {m['jointrank']}, torch {m['torch']})*\n")


def _probe(p: dict | None) -> str:
    if not p:
        return "no perplexity evaluation"
    return (f"WikiText-2 test ({p['text']}) perplexity on {p['windows']} of {p['windows_available']} windows of "
            f"{p['seqlen']} tokens, drawn with seed {p['window_seed']} (windows {p['window_indices']})")


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _pm(d: float, se: float) -> str:
    return f"{d:+.4f} ± {se:.4f}"


def _diff(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and paired SE of b - a over windows."""
    d = [y - x for x, y in zip(a, b)]
    m = sum(d) / len(d)
    se = math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return m, se


def _verdict(d: float, se: float, better: str, worse: str) -> str:
    if d < -2 * se:
        return better
    if d > 2 * se:
        return worse
    return "could not tell (within 2 SE)"


BROKEN = 10.0  # perplexity ratio beyond which a comparison is between two broken models


def _broken(*ratios: float) -> str:
    if all(r > BROKEN for r in ratios):
        return f" — but both are broken (perplexity > {BROKEN:.0f}x dense), so this says little about usable budgets"
    return ""


def _missing(title: str, why: str) -> str:
    return f"{title}\n\n**not run**: {why}\n"


def _intro(exp: Path) -> str:
    return f"""{TITLE}

Generated by `{RUN} experiment report` from the JSON files under `results/experiments/`; do not edit by hand.
Each section gives the command that produced it. Perplexity differences are *paired*: the compressed and the dense
model are scored on the same seeded windows, and ± is the standard error of the mean per-window difference in NLL
(Δ NLL; a perplexity ratio is exp(Δ NLL)). A claim **holds** when the difference is beyond 2 standard errors in the
paper's direction, **does not hold** when beyond 2 SE the other way, and is **could not tell** otherwise.
Model: Gemma-3-270M base (float32, dequantised from the Q4_K_M GGUF the project embeds: its weights carry
quantisation noise a bf16 checkpoint would not). Compute: 2 shared CPU cores, hence few windows and small subsets;
every cut is stated where it applies.
"""


# ---------------------------------------------------------------------------------------------------------------


def _delta_se(a: dict, b: dict) -> float:
    """SE of acc(b) - acc(a): paired over the same documents when both carry per-document scores."""
    from jointrank.evaluate.report import paired_stderr

    paired = paired_stderr(a, b, "acc")
    return paired if paired is not None else math.hypot(a.get("acc_stderr") or 0, b.get("acc_stderr") or 0)


def _table1(exp: Path) -> str:
    title = "## 1. Table 1 analogue: dense vs the paper's structures at 10% / 20% reduction"
    files = _load(exp, "table1")
    if not files:
        return _missing(title, "the zero-shot evaluation at this size did not fit the session's CPU budget; run "
                        f"`{RUN} experiment table1 gemma-3-270m --tasks piqa,arc_easy --limit 200`.")
    out = [title, ""]
    scopes = {sc for _, r in files for sc in r["scopes"]}
    for scope in ("model", "decoder"):
        if scope not in scopes:
            out.append(f"**not run** for the {scope} scope: CPU budget of this session (each perplexity point costs "
                       f"about two minutes on the shared cores); run `{RUN} experiment table1 gemma-3-270m "
                       f"--scopes {scope}`.\n")
    if not any(r["tasks"] for _, r in files):
        out.append("**Zero-shot tasks not run**: on 2 shared CPU cores a 262k-vocabulary model scores a few hundred "
                   "examples of one task in many minutes per configuration; perplexity stands in. Run with "
                   "`--tasks piqa,arc_easy,... --limit N` where compute allows.\n")
    for path, r in files:
        out.append(_cmd(r))
        out.append(f"{_probe(r['probe'])}. Zero-shot: {', '.join(r['tasks']) or 'none'}"
                   + (f" on seeded subsets of {r['limit']} examples each" if r["tasks"] else "") + ".\n")
        dense = r["dense"]
        tasks = r["tasks"]
        header = ["scope", "target", "structure", "solved ratio", "removed (model)", "removed (decoder)", "ppl",
                  "Δ NLL vs dense"] + tasks + (["avg", "retention"] if tasks else [])
        rows = []
        base = dense.get("wikitext2")
        dense_avg = _avg(dense.get("zero_shot"), tasks)
        rows.append(["dense", "-", "-", "-", 0.0, 0.0, base["ppl"] if base else "-", "-"]
                    + [_acc(dense.get("zero_shot"), t) for t in tasks] + ([dense_avg, 1.0] if tasks else []))
        for row in r["rows"]:
            if "infeasible" in row:
                rows.append([row["scope"], row["target"], row["structure"], "infeasible: " + row["infeasible"],
                             "", "", "", ""] + [""] * len(tasks) + (["", ""] if tasks else []))
                continue
            w = row.get("wikitext2")
            avg = _avg(row.get("zero_shot"), tasks)
            rows.append([row["scope"], row["target"], row["structure"], row["ratio"], row["reduction_model"],
                         row["reduction_decoder"], w["ppl"] if w else "-",
                         _pm(w["delta_nll"], w["delta_nll_se"]) if w else "-"]
                        + [_acc(row.get("zero_shot"), t) for t in tasks]
                        + ([avg, avg / dense_avg if dense_avg else "-"] if tasks else []))
        out.append(_table(header, rows))
        feasible = [x for x in r["rows"] if "infeasible" not in x and x.get("wikitext2")]
        if feasible:
            out.append("**Verdicts** (paper: ~10% reduction costs little; joint is the better use of a budget):\n")
            for scope in r["scopes"]:
                for target in r["targets"]:
                    cell = {x["structure"]: x for x in feasible if x["scope"] == scope and x["target"] == target}
                    if "joint" in cell and "separate" in cell:
                        d, se = _diff(cell["separate"]["wikitext2"]["window_nll"], cell["joint"]["wikitext2"]["window_nll"])
                        out.append(f"- {scope} scope, {target:.0%}: joint vs separate everywhere, Δ NLL {_pm(d, se)}: "
                                   f"{_verdict(d, se, 'joint better (holds)', 'separate better (does not hold)')}"
                                   f"{_broken(cell['joint']['wikitext2']['ppl_ratio'], cell['separate']['wikitext2']['ppl_ratio'])}.")
                    for name, x in cell.items():
                        w = x["wikitext2"]
                        out.append(f"- {scope} scope, {target:.0%}, {name}: perplexity x{w['ppl_ratio']:.3f} of dense "
                                   f"(Δ NLL {_pm(w['delta_nll'], w['delta_nll_se'])})"
                                   + _zero_shot_retention(dense.get("zero_shot"), x.get("zero_shot"), tasks) + ".")
            out.append("")
    return "\n".join(out)



def _zero_shot_retention(dense: dict | None, comp: dict | None, tasks: list[str]) -> str:
    """'; zero-shot average A vs dense D, retention R% (Δ ± SE)': the SE of the average's difference combines the
    tasks' (paired per document where both carry per-document scores), tasks taken as independent."""
    a, b = _avg(dense, tasks), _avg(comp, tasks)
    if a is None or b is None:
        return ""
    se = math.sqrt(sum(_delta_se(dense[t], comp[t]) ** 2 for t in tasks)) / len(tasks)
    chance = sum(CHANCE[t] for t in tasks) / len(tasks) if all(t in CHANCE for t in tasks) else None
    floor = (f"; guessing scores about {chance:.3f}, i.e. a retention of {100 * chance / a:.0f}%, so "
             + ("this is chance level" if b < chance + 2 * se else "this is above chance")) if chance else ""
    return (f"; zero-shot average {b:.4f} vs dense {a:.4f}, retention {100 * b / a:.2f}% "
            f"(Δ {_pm(b - a, se)}{floor}; paper on LLaMA-7B: 98.80% at 10%, 93.43% at 20%)")


def _acc(zs: dict | None, task: str):
    if not zs or task not in zs:
        return "-"
    x = zs[task]
    return f"{x['acc']:.3f} ± {x.get('acc_stderr', float('nan')):.3f} (n={x.get('n', '?')})"


def _avg(zs: dict | None, tasks: list[str]):
    if not zs or not tasks or any(t not in zs for t in tasks):
        return None
    return sum(zs[t]["acc"] for t in tasks) / len(tasks)


# ---------------------------------------------------------------------------------------------------------------


def _joint_vs_separate(exp: Path) -> str:
    title = "## 2. Figure 3 analogue: joint vs separate rank-k"
    files = _load(exp, "joint_vs_separate")
    out = [title, "", "Joint = the members stacked and factorised once, sharing one input basis; separate = each member "
           "its own rank-k. Ratio = k / min(Σ d_out, d_in) of each unit (the core's rule), so at one ratio a joint "
           "unit and the separate units have the same number of basis vectors per unit *limit*, not the same "
           "parameters; the parameter axis (Eq. 9) is the fair one. Member errors are ‖W − Ŵ‖_F / ‖W‖_F, averaged "
           "over layers.\n"]
    settings: dict[str, list] = {}
    for p, r in sorted(files, key=lambda f: (f[1].get("tag") or "", str(f[0]))):
        settings.setdefault(r["setting"], []).append((p, r))
    if not settings:
        return _missing(title, f"no results yet; run `{RUN} experiment joint-vs-separate gemma-3-270m`.")
    names = {"qk_head": "Q/K within each head (GQA expanded: one K copy per query head)",
             "qk": "Q/K whole matrices", "gate_up": "gate/up"}
    for setting in ("qk_head", "qk", "gate_up"):
        if setting not in settings:
            out.append(_missing(f"### {names[setting]}", f"not run yet: `{RUN} experiment joint-vs-separate "
                                f"gemma-3-270m --settings {setting}`"))
            continue
        for path, r in settings[setting]:
            out += _jvs_setting(exp, path, r, names[setting])
    return "\n".join(out)


def _jvs_setting(exp: Path, path: Path, r: dict, name: str) -> list[str]:
    setting = r["setting"]
    if True:
        out = [f"### {name}" + (f" (sweep `{r['tag']}`)" if r.get("tag") else ""), "", _cmd(r),
               _probe(r["probe"]) + ".", ""]
        if r.get("dense"):
            out.append(f"Dense perplexity on these windows: {r['dense']['ppl']:.3f}.\n")
        members = list(r["points"][0]["member_rel_error"])
        evaluated = "delta_nll" in r["points"][0]
        header = ["method", "ratio", "ranks", "params kept"] + [f"rel. error {m}" for m in members] + \
            (["ppl", "Δ NLL vs dense"] if evaluated else [])
        rows = []
        for p in sorted(r["points"], key=lambda p: (p["method"], -p["ratio"])):
            rows.append([p["method"], p["ratio"], ",".join(map(str, p["ranks"])), p["params_kept"]]
                        + [p["member_rel_error"][m] for m in members]
                        + ([p["ppl"], _pm(p["delta_nll"], p["delta_nll_se"])] if evaluated else []))
        out.append(_table(header, rows))
        png = path.with_suffix(".png")
        if png.exists():
            out.append(f"![{setting}]({_rel(exp, png)})\n")
        out.append("**Verdicts**\n")
        by = {(p["method"], p["ratio"]): p for p in r["points"]}
        if evaluated:
            for ratio in r["ratios"]:
                j, s = by.get(("joint", ratio)), by.get(("separate", ratio))
                if j and s:
                    d, se = _diff(s["window_nll"], j["window_nll"])
                    out.append(f"- equal ratio {ratio}: joint − separate Δ NLL {_pm(d, se)} (joint keeps "
                               f"{j['params_kept']:.3f} of the parameters, separate {s['params_kept']:.3f}): "
                               f"{_verdict(d, se, 'joint better', 'separate better')}"
                               f"{_broken(j['ppl_ratio'], s['ppl_ratio'])}.")
            for e in r.get("equal_params", []):
                d = e["joint_delta_nll"] - e["separate_delta_nll_interp"]
                se = math.hypot(e["joint_delta_nll_se"], e["separate_delta_nll_se_interp"])
                out.append(f"- equal parameters ({e['params_kept']:.3f} kept): joint Δ NLL "
                           f"{_pm(e['joint_delta_nll'], e['joint_delta_nll_se'])}, separate (interpolated) "
                           f"{_pm(e['separate_delta_nll_interp'], e['separate_delta_nll_se_interp'])}: "
                           f"{_verdict(d, se, 'joint better', 'separate better')} (unpaired SE, conservative)"
                           f"{_broken(math.exp(e['joint_delta_nll']), math.exp(e['separate_delta_nll_interp']))}.")
            if not r.get("equal_params"):
                out.append("- equal parameters: the two sweeps' parameter ranges do not overlap at any joint point.")
        if setting == "qk":
            starve = [(p["ratio"], p["member_rel_error"]["k"], by[("separate", p["ratio"])]["member_rel_error"]["k"])
                      for p in r["points"] if p["method"] == "joint" and ("separate", p["ratio"]) in by]
            worse = [x for x in starve if x[1] > x[2]]
            out.append(f"- K under GQA: joint K error exceeds separate K error at {len(worse)} of {len(starve)} ratios ("
                       + ", ".join(f"{a}: {b:.3f} vs {c:.3f}" for a, b, c in starve) + ")"
                       + (" — the joint SVD spends its basis on the larger Q." if worse else
                          " — no starvation of K at equal ratio here (the joint unit's rank is ratio x d_in, separate "
                          "K's is ratio x its own row count, so at equal ratio K gets more basis vectors jointly)."))
        over = [p for p in r["points"] if p["params_kept"] >= 1]
        if over:
            out.append(f"- {len(over)} of {len(r['points'])} points store at least as many parameters as the dense "
                       "matrices (Eq. 9: a factorisation saves only below k = d_out·d_in / (d_out + d_in))"
                       + ("; per head under GQA each query head stores its own K approximation" if r["per_head"] else "")
                       + ": quality comparisons there say nothing about compression.")
        out.append("")
    return out


# ---------------------------------------------------------------------------------------------------------------


def _layers(exp: Path) -> str:
    title = "## 3. Table 2 analogue: which layers matter (joint gate/up)"
    files = _load(exp, "layers")
    if not files:
        return _missing(title, f"no results yet; run `{RUN} experiment layers gemma-3-270m`.")
    out = [title, ""]
    for path, r in files:
        out += [_cmd(r), f"Joint rank-k of gate/up at ratio {r['ratio']}; quarters of {r['num_layers']} layers: "
                f"{r['quarters']}. {_probe(r['probe'])}. Dense perplexity {r['dense']['ppl']:.3f}.\n"]
        rows = [[x["kind"], x["label"], x["params_removed"], x["ppl"], _pm(x["delta_nll"], x["delta_nll_se"])]
                for x in r["rows"]]
        out.append(_table(["design", "configuration", "params removed", "ppl", "Δ NLL vs dense"], rows))
        png = path.with_suffix(".png")
        if png.exists():
            out.append(f"![layers]({_rel(exp, png)})\n")
        out.append("**Verdicts** (paper: bottom layers matter more)\n")
        sizes = [len(q) for q in r["quarters"]]
        caveat = (f" (caveat: the quarters hold {sizes} layers, so the first quarter's approximation removes "
                  f"{sizes[0] / sizes[-1]:.2f}x the parameters of the last's)") if sizes[0] != sizes[-1] else ""
        unchanged = [x for x in r["rows"] if x["kind"] == "quarter_unchanged"]
        if len(unchanged) >= 2:
            first, last = unchanged[0], unchanged[-1]
            d, se = _diff(last["window_nll"], first["window_nll"])
            out.append(f"- Table 2 design: leaving the first quarter unchanged vs the last, Δ NLL {_pm(d, se)}: "
                       f"{_verdict(d, se, 'holds (sparing the bottom helps more)', 'does not hold (sparing the top helps more)')}{caveat}.")
        only = [x for x in r["rows"] if x["kind"] == "quarter_only"]
        if len(only) >= 2:
            d, se = _diff(only[-1]["window_nll"], only[0]["window_nll"])
            out.append(f"- Converse design: approximating only the first quarter vs only the last, Δ NLL {_pm(d, se)}: "
                       f"{_verdict(d, se, 'does not hold (the bottom quarter hurts less)', 'holds (the bottom quarter hurts more)')}{caveat}.")
        single = [x for x in r["rows"] if x["kind"] == "single"]
        if len(single) >= 4:
            ys = [x["delta_nll"] for x in single]
            half = len(ys) // 2
            lo, hi = sum(ys[:half]) / half, sum(ys[half:]) / (len(ys) - half)
            rho = _spearman(list(range(len(ys))), ys)
            worst = max(single, key=lambda x: x["delta_nll"])
            out.append(f"- One layer at a time: mean Δ NLL {lo:+.4f} over the bottom half vs {hi:+.4f} over the top "
                       f"half; Spearman correlation of Δ NLL with depth {rho:+.2f} (negative = bottom layers matter "
                       f"more); most sensitive: {worst['label']} ({_pm(worst['delta_nll'], worst['delta_nll_se'])}).")
        out.append("")
    return "\n".join(out)


def _premise(a: dict) -> str:
    above = a["layers_above_random_3sd"] / a["layers"]
    if above < 0.5:
        return "Does not hold: in most layers the overlap is within chance."
    if a["k_energy_in_q_top_mean"] < 0.5:
        return "Holds weakly (above chance in most layers), not in the strong form the method assumes."
    return "Holds: the dominant input directions are largely shared."


def _spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(x), ranks(y)
    n = len(x)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")


# ---------------------------------------------------------------------------------------------------------------


def _denoise(exp: Path) -> str:
    title = "## 4. Denoising: does any ratio beat dense?"
    files = _load(exp, "denoise")
    if not files:
        return _missing(title, f"no results yet; run `{RUN} experiment denoise gemma-3-270m`.")
    out = [title, ""]
    for path, r in files:
        out += [_cmd(r), f"{_probe(r['probe'])}. Dense perplexity {r['dense']['ppl']:.3f} "
                f"(SE over windows of the mean NLL {r['dense']['nll_se']:.4f}).\n"]
        if r.get("window_noise"):
            vals = [r["dense"]["ppl"]] + [n["ppl"] for n in r["window_noise"]]
            out.append("Noise between window choices: dense perplexity on other seeded window samples "
                       + ", ".join(f"seed {n['window_seed']}: {n['ppl']:.3f}" for n in r["window_noise"])
                       + f" (range {min(vals):.3f}–{max(vals):.3f}): absolute perplexities from {r['probe']['windows']}"
                       " windows are only comparable on the same windows, which is why every comparison here is paired.\n")
        tasks = r.get("tasks") or []
        header = ["configuration", "ratio", "energy kept", "ppl", "Δ NLL vs dense", "beats dense by > 2 SE"] + tasks
        rows = []
        for p in r["points"]:
            rows.append([p["config"], p["ratio"], p["energy_kept_mean"], p["ppl"], _pm(p["delta_nll"], p["delta_nll_se"]),
                         p["improves_beyond_2se"]] + [_acc(p.get("zero_shot"), t) for t in tasks])
        if tasks:
            rows.insert(0, ["dense", 1.0, 1.0, r["dense"]["ppl"], "-", "-"] + [_acc(r.get("dense_zero_shot"), t) for t in tasks])
        out.append("Configurations: " + "; ".join(f"{c} = " + ", ".join(f"{g} {m}" for g, m in groups)
                                                  for c, groups in r["config_groups"].items()) + ".\n")
        out.append(_table(header, rows))
        png = path.with_suffix(".png")
        if png.exists():
            out.append(f"![denoise]({_rel(exp, png)})\n")
        wins = [p for p in r["points"] if p["improves_beyond_2se"]]
        verdict = ("**Verdict** (paper: rank-k with large k sometimes improves a score): "
                   + (f"perplexity improves beyond 2 SE at {', '.join(str(p['config']) + '@' + str(p['ratio']) for p in wins)}: holds "
                      "for perplexity on these windows." if wins else
                      "no configuration and ratio improves WikiText-2 perplexity beyond 2 SE: does not hold for "
                      f"perplexity on {r.get('model', 'this model')} (a null result)."))
        if tasks:
            zs_wins = []
            for p in r["points"]:
                for t in tasks:
                    a, b = (r.get("dense_zero_shot") or {}).get(t), (p.get("zero_shot") or {}).get(t)
                    if a and b and b["acc"] - a["acc"] > 2 * _delta_se(a, b):
                        zs_wins.append(f"{t} at {p['config']}@{p['ratio']}")
            kind = "paired" if all("per_doc" in (x or {}) for x in (r.get("dense_zero_shot") or {}).values()) else "unpaired"
            # on the verdict line itself, so the summary at the top carries it too
            verdict += (f" Zero-shot ({', '.join(tasks)}): " + (
                ", ".join(zs_wins) + f" beat dense beyond 2 ({kind}) SE." if zs_wins else
                f"no task beats dense beyond 2 ({kind}) SE of the difference at any ratio."))
        out += [verdict, ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------


def _watermark(exp: Path) -> str:
    title = "## 5. Watermark purification (§5.3, appendix C)"
    files = _load(exp, "watermark")
    if not files:
        return _missing(title, f"no results yet; run `{RUN} watermark gemma-3-270m`.")
    out = [title, ""]
    for path, r in files:
        s, t = r["settings"], r["training"]
        out += [_cmd(r),
                f"Sentence: “{r['sentence']}” (trigger: its first {s['prompt_words']} words; {len(r['target_ids'])} "
                f"tokens to reproduce). Fine-tune: {s['optimizer']}, lr {s['lr']}, weight decay {s['weight_decay']}, "
                f"batch {s['batch']} sequences of BOS + up to {s['context_tokens']} random WikiText tokens + the "
                f"sentence (loss on the sentence only), decoder layers `{s['train_layers']}` trainable "
                f"({t['trained_parameters']:,} parameters; embeddings frozen), at most {s['max_steps']} steps "
                f"(+{s['extra_steps']} after the first reproduction). Paper: 4096-token batches on 8 GPUs, ≤ 5 steps.\n",
                f"- before fine-tuning: sentence perplexity {r['before']['sentence_ppl']:.2f}, greedy reproduces it: "
                f"{_fmt(r['before']['reproduced'])}",
                f"- fine-tuning: first reproduction at step {t['reproduced_at_step']}; losses "
                + ", ".join(f"{x['loss']:.3f}" for x in t["steps"]) + f" ({sum(x['seconds'] for x in t['steps']):.0f} s)",
                f"- after: sentence perplexity {r['after_fine_tune']['sentence_ppl']:.3f}, reproduces: "
                f"{_fmt(r['after_fine_tune']['reproduced'])}"]
        if r.get("wikitext_original"):
            d, se = _diff(r["wikitext_original"]["window_nll"], r["wikitext_tuned"]["window_nll"])
            out.append(f"- WikiText-2 perplexity: original {r['wikitext_original']['ppl']:.3f}, fine-tuned "
                       f"{r['wikitext_tuned']['ppl']:.3f} (Δ NLL {_pm(d, se)}); {_probe(r['probe'])}")
        out.append(f"\nSweep: {s['method']} rank-k of {s['group']} on layers `{s['layers']}` (paper: last 24 of 32).\n")
        evaluated = "wikitext_ppl" in r["points"][0]
        header = ["ratio", "energy kept", "sentence ppl", "greedy reproduces", "leading tokens matched"] + \
            (["WikiText-2 ppl", "Δ NLL vs fine-tuned", "Δ NLL vs original"] if evaluated else [])
        rows = []
        for p in r["points"]:
            rows.append([p["ratio"], p["energy_kept_mean"], p["sentence_ppl"], p["reproduced"],
                         f"{p['prefix_matched']}/{p['tokens_to_reproduce']}"]
                        + ([p["wikitext_ppl"], _pm(p["vs_tuned"]["delta_nll"], p["vs_tuned"]["delta_nll_se"]),
                            _pm(p["vs_original"]["delta_nll"], p["vs_original"]["delta_nll_se"])] if evaluated else []))
        out.append(_table(header, rows))
        png = path.with_suffix(".png")
        if png.exists():
            out.append(f"![watermark]({_rel(exp, png)})\n")
        if not r["after_fine_tune"]["reproduced"]:
            out.append("**Verdict**: could not tell — the fine-tune did not implant the sentence within the step budget.\n")
            continue
        pts = sorted(r["points"], key=lambda p: -p["ratio"])
        gone = next((p for p in pts if not p["reproduced"]), None)
        back = [p for p in pts if gone and p["ratio"] < gone["ratio"] and p["reproduced"]]
        if gone is None:
            last = pts[-1]
            cost = (f", while WikiText-2 perplexity went from {r['wikitext_tuned']['ppl']:.3f} to "
                    f"{last['wikitext_ppl']:.3f} at ratio {last['ratio']}: the approximation damages general ability "
                    "long before it touches the implanted sentence") if evaluated else ""
            out.append("**Verdict**: does not hold at these ratios — greedy decoding still reproduces the sentence at "
                       f"every ratio tried (sentence perplexity {r['after_fine_tune']['sentence_ppl']:.3f} → "
                       f"{last['sentence_ppl']:.3f}){cost}.\n")
            continue
        cost = ""
        if evaluated:
            v = gone["vs_original"]
            cost = (f"; at that ratio WikiText-2 perplexity is {gone['wikitext_ppl']:.3f} (Δ NLL vs the original model "
                    f"{_pm(v['delta_nll'], v['delta_nll_se'])})")
        ratios_above = [p for p in pts if p["ratio"] > gone["ratio"]]
        sentence_up = gone["sentence_ppl"] > r["after_fine_tune"]["sentence_ppl"]
        out.append(f"**Verdict**: the sentence is no longer reproduced from ratio {gone['ratio']} down "
                   f"({len(ratios_above)} higher ratios still reproduce it){cost}. Sentence perplexity "
                   f"{'rises' if sentence_up else 'does not rise'} ({r['after_fine_tune']['sentence_ppl']:.3f} → "
                   f"{gone['sentence_ppl']:.3f}). "
                   + (f"It comes back at lower ratios ({', '.join(str(p['ratio']) for p in back)}), like the paper's "
                      "LLaMA-7B 'concealed, not removed' case." if back else "It does not come back at lower ratios.")
                   + " Whether this is *purification* rather than general damage is judged by the cost column: "
                   "the paper's claim holds only if the sentence goes while WikiText-2 perplexity stays near the "
                   "original.\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------


def _spectra(exp: Path) -> str:
    title = "## 6. Spectra and the Q/K shared-subspace premise"
    files = _load(exp, "spectra")
    if not files:
        return _missing(title, f"no results yet; run `{RUN} experiment spectra gemma-3-270m`.")
    path, r = files[0]
    out = [title, "", _cmd(r), "Energy = fraction of ‖W‖²_F kept by the top-k singular values; ratio = k / min(d_out, d_in).\n"]
    rows = [[k, v["ratio_for_90pct_energy_mean"], v["ratio_for_90pct_energy_min"], v["ratio_for_90pct_energy_max"],
             v["ratio_for_99pct_energy_mean"]] for k, v in r["summary"]["energy"].items()]
    out.append(_table(["matrix", "ratio for 90% energy (mean over layers)", "min layer", "max layer",
                       "ratio for 99% energy (mean)"], rows))
    d = exp / "spectra"
    if (d / "energy.png").exists():
        out.append(f"![energy]({_rel(exp, d / 'energy.png')})\n")
    out.append("Principal angles between the top-r right singular subspaces of W_Q and W_K (W_Q has full row rank "
               "here, so its whole row space is the input space; the premise can only be about dominant directions). "
               "Random baseline: two Haar-random r-dim subspaces of the same input space (mean ± SD over 20 draws).\n")
    rows = []
    for rr, a in r["summary"]["qk_angles"].items():
        rows.append([rr, a["mean_cos_over_layers"], f"{a['min_layer_mean_cos']:.3f}–{a['max_layer_mean_cos']:.3f}",
                     f"{a['random_mean_cos']:.3f} ± {a['random_sd_cos']:.3f}",
                     f"{a['layers_above_random_3sd']}/{a['layers']}", a["k_energy_in_q_top_mean"],
                     a["random_energy_share"]])
    out.append(_table(["r", "mean cos (over layers)", "layer range", "random", "layers > random + 3 SD",
                       "share of ‖K‖² in Q's top-r", "random share (r/d_in)"], rows))
    if (d / "qk_angles.png").exists():
        out.append(f"![qk angles]({_rel(exp, d / 'qk_angles.png')})\n")
    a64 = r["summary"]["qk_angles"].get("64") or list(r["summary"]["qk_angles"].values())[-1]
    e = r["summary"]["energy"]
    out.append("**Verdicts**\n")
    out.append(f"- Q and K share an input subspace (Eq. 14–15): their dominant input directions overlap more than "
               f"random ones in {a64['layers_above_random_3sd']}/{a64['layers']} layers (mean cos "
               f"{a64['mean_cos_over_layers']:.3f} vs {a64['random_mean_cos']:.3f}), but far from identical: Q's top "
               f"subspace holds {a64['k_energy_in_q_top_mean']:.1%} of K's energy vs {a64['random_energy_share']:.1%} "
               "for a random one. " + _premise(a64))
    gu = e["gate+up"]["ratio_for_90pct_energy_mean"]
    out.append(f"- Low rank: 90% of the energy needs a ratio of {gu:.2f} "
               f"(gate+up), {e['q+k']['ratio_for_90pct_energy_mean']:.2f} (q+k), {e['down']['ratio_for_90pct_energy_mean']:.2f} "
               "(down) on average: " + ("these weights are not strongly low-rank, so any sizeable rank cut drops real "
                                        "energy." if gu > 0.5 else "most of the energy sits in a minority of directions."))
    return "\n".join(out) + "\n"


def _activations(exp: Path) -> str:
    title = "## 7. Why: weight-space error vs error on real inputs"
    files = _load(exp, "activations")
    if not files:
        return _missing(title, f"no results yet; run `{RUN} experiment activations gemma-3-270m`.")
    path, r = files[0]
    out = [title, "", _cmd(r), f"Inputs: {_probe(r['probe'])}, captured at each linear layer with hooks. Errors are "
           "means over layers.\n"]
    rows = [[x["group"], x["method"], x["member"], x["ratio"], x["weight_rel_error"], x["activation_rel_error"],
             x["amplification"], f"{x['layers_amplified']}/{x['layers']}"] for x in r["summary"]]
    out.append(_table(["group", "method", "member", "ratio", "‖W−Ŵ‖/‖W‖", "‖(W−Ŵ)X‖/‖WX‖", "amplification",
                       "layers where output error > weight error"], rows))
    png = path.with_suffix(".png")
    if png.exists():
        out.append(f"![activations]({_rel(exp, png)})\n")
    top = max(x["ratio"] for x in r["summary"])
    amp = [x["amplification"] for x in r["summary"] if x["ratio"] == top]
    low = [x["amplification"] for x in r["summary"] if x["ratio"] == min(y["ratio"] for y in r["summary"])]
    out.append(f"**Verdict** (premise: dropping the weakest weight directions is nearly harmless): at ratio {top} the "
               f"relative error on real inputs is {min(amp):.1f}x to {max(amp):.1f}x the weight-space error "
               + (f"— does not hold on {r.get('model', 'this model')}: the inputs lean on the very directions a "
                  "data-free truncation "
                  "drops first, so a 'small' cut is not small for the model (data-aware methods such as ASVD and "
                  "SVD-LLM exist for this). "
                  if min(amp) > 1.2 else "— no strong amplification. ")
               + f"At the lowest ratio the factor is {min(low):.1f}x to {max(low):.1f}x.\n")
    return "\n".join(out)
