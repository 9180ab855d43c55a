"""Why distillation loses zero-shot accuracy, and which healing recipe keeps it: a probe on the 10% row.

    python research/experiments/heal_zeroshot.py run [--only VARIANT,...]   # resumable: finished points are kept
    python research/experiments/heal_zeroshot.py report

results/quality.md found that healing the best no-user-data row at 10% (svd_llm/self/distill: global SVD-LLM, 16k
self-generated tokens, 100 distillation steps at lr 1e-4, i.e. ~3 passes over 32 windows) brings WikiText-2
perplexity to dense (1.003x) but zero-shot retention down from 96.3% (unhealed) to 91.7%, HellaSwag and ARC-easy
carrying most of the loss. This probe rebuilds that row (the same code path as research/bench/quality.py: Gemma-3-
270M, the same cached self-generated text, plan and compression) and distils it with other recipes, measuring at
several steps of one run (the window order of a run is a prefix of a longer one: step 32 of a 100-step run is the
32-step run): WikiText-2 perplexity on quality.md's 32 windows, and a subset of the zero-shot tasks (--tasks, default
the two that lose most) on quality.md's first 250 documents, so each point is paired per window and per document
against quality.json's dense, unhealed (svd_llm/self/none) and healed (svd_llm/self/distill) records. A quick probe
to choose a recipe; the verdict is the full protocol in results/quality.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
OUT = REPO / "results" / "heal_zeroshot"
BUDGET, ROW = 0.10, "svd_llm"
TASKS = ("hellaswag", "arc_easy")

# name -> (distillation settings, steps at which to measure); all share the seed, hence the window order
VARIANTS = {
    # quality.md's lr: step 0 is the unhealed model, step 32 one pass over the windows (step 100 is the recorded row)
    "lr1e-4": ({"steps": 32, "lr": 1e-4}, (0, 32)),
    # lower learning rates: does the recorded recipe's lr 1e-4 overshoot on text as a model sees it (with BOS)?
    "lr3e-5": ({"steps": 100, "lr": 3e-5}, (32, 100)),
    # the training KL of the recorded recipe falls in 3 steps and then only wanders (0.41, 0.32, 0.17, ... last ten
    # 0.18-0.48): is lr 1e-4 too high to make progress on text as a model sees it?
    "lr1e-5": ({"steps": 100, "lr": 1e-5}, (32, 100)),
    # the recorded recipe distilled on C4 text instead (the compression still calibrated on self-generated text, so
    # step 0 is the same model): is it the self-generated text or the distillation that costs the accuracy?
    "c4-lr1e-4": ({"steps": 100, "lr": 1e-4}, (100,)),
    # the same 100 steps on 100 distinct C4 windows (one pass) instead of 32 windows three times: does the variety of
    # the text decide what distillation does to accuracy?
    "c4x100-lr1e-4": ({"steps": 100, "lr": 1e-4}, (32, 100)),
    # the recorded recipe again (its zero-shot is quality.json's), for its NLL by position with and without BOS
    "lr1e-4x3": ({"steps": 100, "lr": 1e-4}, (100,)),
    # and with no user data: 100 distinct self-generated windows (sampled like the compression's 32, more of them)
    "selfx100-lr1e-4": ({"steps": 100, "lr": 1e-4}, (100,)),
    # What bounds healing at lr 3e-5 (all its gain on BOS windows came in the first 32 steps, over 32 windows)?
    # The amount of distinct text: the same 100 steps on 100 distinct self-generated windows, one pass ...
    "selfx100-lr3e-5": ({"steps": 100, "lr": 3e-5}, (32, 100)),
    # ... or the kind of text: 100 windows of WikiText-2 *validation* text, the register of the test windows (user
    # data, and in-domain: a ceiling for what distillation text can do here, not a recipe without user data)
    "wikivalid-lr3e-5": ({"steps": 100, "lr": 3e-5}, (32, 100)),
}
PERPLEXITY_ONLY = {"lr1e-4x3", "selfx100-lr3e-5", "wikivalid-lr3e-5"}
DISTILL_TEXT = {"c4-lr1e-4": "c4", "c4x100-lr1e-4": "c4", "wikivalid-lr3e-5": "wikitext-valid"}
# variant -> windows of 512 to distil on (CAL_TOKENS / 512 otherwise)
DISTILL_WINDOWS = {"c4x100-lr1e-4": 100, "selfx100-lr1e-4": 100, "selfx100-lr3e-5": 100, "wikivalid-lr3e-5": 100}
# WikiText-2 NLL by position in the window (tokens predicted at positions [a, b)): zero-shot prompts are short, the
# distillation windows and the perplexity windows long. "positions" measures dense (before compressing) and step 0.
BUCKETS = ((0, 32), (32, 128), (128, 511))
POSITIONS = "positions"  # variant -> the text it distils on; "self" (the compression's) otherwise
# name -> (distillation settings, weights): the recorded recipe trained to the end, then every factor set to
# (1 - w) * its value before healing + w * its value after (weight-space interpolation, as WiSE-FT does for fine-tuned
# models), measured at each weight; the point's key is "STEPS@wW"
INTERPOLATIONS = {
    "lr1e-4-interp": ({"steps": 100, "lr": 1e-4}, (0.5,)),
}


def child(variant: str, tasks: list[str], results_path: Path) -> None:
    import torch

    from jointrank import compress_, plan_for
    from jointrank.evaluate import evaluate
    from jointrank.heal import DistillSettings, _window_order, distill_, teacher_states
    from jointrank.methods.selfgen import self_calibration
    from jointrank.sources import load_model
    from research.bench import quality as Q

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if variant in PERPLEXITY_ONLY:
        tasks = []
    if variant == POSITIONS:
        settings, at = {"steps": 1}, ("dense", 0)
        tasks = []
    else:
        settings, at = VARIANTS.get(variant) or INTERPOLATIONS[variant]
    settings = DistillSettings(**settings)
    weights = INTERPOLATIONS[variant][1] if variant in INTERPOLATIONS else ()
    if weights:
        at = tuple(f"{settings.steps}@w{w:g}" for w in weights)
    done = load(results_path).get(variant, {})
    model, tokenizer, _ = load_model(Q.P.model)

    def measure(step) -> None:
        # what a point lacks is measured, what it has is kept: the same variant and step rebuild the same model
        # (seeded window order, deterministic steps), so a later run can add zero-shot or BOS windows to it
        point = dict(done.get(str(step), {}))
        todo = [t_ for t_ in tasks if t_ not in point.get("zeroshot", {})]
        if "nll_by_position_bos" in point and not todo:
            return
        t = time.perf_counter()
        with torch.no_grad():
            if "nll_by_position_bos" not in point:
                point["nll_by_position"] = nll_by_position(model, tokenizer)
                point["nll_by_position_bos"] = nll_by_position(model, tokenizer, bos=True)
                point["perplexity"] = perplexity_record(point)
            if todo:
                res = evaluate(model, tokenizer, todo, data_dir=str(Q.DATA), limit=Q.P.zs_limit,
                               progress=False)["results"]
                point["zeroshot"] = {**point.get("zeroshot", {}), **{
                    t_: {"acc": res[t_]["acc"], "per_doc": res[t_]["per_doc"]["acc"]} for t_ in todo}}
        point["seconds"] = point.get("seconds", 0) + time.perf_counter() - t
        done[str(step)] = point
        store(results_path, variant, step, point)
        print(f"{variant} step {step}: ppl {point['perplexity']['perplexity']:.3f}, with BOS "
              f"{point['perplexity'].get('perplexity_bos', float('nan')):.3f} "
              + " ".join(f"{t_} {v['acc']:.3f}" for t_, v in point.get("zeroshot", {}).items()), flush=True)

    calibration = self_calibration(model, tokenizer, Q.CAL_TOKENS, cache_dir=Q.CACHE, progress=False)
    ids = calibration.input_ids
    tokens = DISTILL_WINDOWS.get(variant, Q.CAL_TOKENS // Q.SEQLEN) * Q.SEQLEN
    if variant in DISTILL_TEXT:
        from jointrank.methods.calibration import load_text

        texts = {"c4": Q.C4_FILE, "wikitext-valid": Q.DATA / "wikitext-2-raw" / "wiki.valid.raw"}
        text = texts[DISTILL_TEXT[variant]]
        ids = load_text(text, tokenizer, tokens=tokens, seqlen=Q.SEQLEN, seed=0).input_ids
    elif tokens != Q.CAL_TOKENS:  # sampled from the dense model, before it is compressed
        ids = self_calibration(model, tokenizer, tokens, cache_dir=Q.CACHE, progress=False).input_ids
    if variant == POSITIONS:
        measure("dense")
    else:
        states = teacher_states(model, ids, _window_order(int(ids.shape[0]), max(int(str(s).split("@")[0])
                                                                                for s in at), settings.seed),
                                progress=False)
    plan = plan_for(model, Q.config_for(ROW, BUDGET), calibration=calibration, progress=False)
    compress_(model, plan, progress=False, calibration=calibration)

    if 0 in at:
        measure(0)
    if all("nll_by_position_bos" in done.get(str(s), {}) and all(t_ in done[str(s)].get("zeroshot", {})
                                                                 for t_ in tasks) for s in at):
        return
    if weights:
        from jointrank.heal import trainable_factors

        before = [p.detach().clone() for _, p in trainable_factors(model)]
        distill_(model, states, ids, settings, progress=False)
        after = [p.detach().clone() for _, p in trainable_factors(model)]
        for w, key in zip(weights, at):
            with torch.no_grad():
                for (_, p), a, b in zip(trainable_factors(model), before, after):
                    p.copy_((1 - w) * a + w * b)
            measure(key)
        return
    distill_(model, states, ids, DistillSettings(**{**settings.__dict__, "steps": max(at)}), progress=False,
             on_step=lambda step, loss: measure(step) if step in at else None)


def nll_by_position(model, tokenizer, *, bos: bool = False) -> list[list[float]]:
    """Per window (quality.md's 32), the mean next-token NLL of the positions in each of BUCKETS. `bos`: each window
    as [BOS] + its first 511 tokens (quality.md's windows are cut from the tokenised text, so all but the first start
    mid-text without BOS, which Gemma needs)."""
    import torch.nn.functional as F

    from jointrank.evaluate.perplexity import soft_cap, split_model, start_with_bos
    from research.bench import quality as Q

    windows, _, _ = Q.eval_windows(tokenizer)
    decoder, head, softcap = split_model(model)
    out = []
    if bos:
        windows = start_with_bos(windows, tokenizer.bos_token_id)
    for row in windows:
        w = row.unsqueeze(0)
        hidden = decoder(input_ids=w, use_cache=False).last_hidden_state[:, :-1]
        per = []
        for a, b in BUCKETS:
            logits = soft_cap(head(hidden[:, a:b]).float(), softcap)
            per.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[0, 1 + a:1 + b])))
        out.append(per)
    return out


def whole_window_nll(per_bucket: list[list[float]]) -> list[float]:
    """Per window, the mean NLL over all its predicted positions, from the per-bucket means."""
    sizes = [b - a for a, b in BUCKETS]
    return [sum(n * x for n, x in zip(sizes, w)) / sum(sizes) for w in per_bucket]


def perplexity_record(point: dict) -> dict:
    """quality.py's perplexity fields (per-window NLL and perplexity, without and with BOS) from a point's NLL by
    position: the same windows and numbers as Q.measure_perplexity, from one forward per window instead of two."""
    out = {}
    for key, suffix in (("nll_by_position", ""), ("nll_by_position_bos", "_bos")):
        per_window = whole_window_nll(point[key])
        out[f"per_window_nll{suffix}"] = per_window
        out[f"perplexity{suffix}"] = math.exp(sum(per_window) / len(per_window))
    return out


def bos_summary(path: Path = OUT.with_suffix(".json")) -> dict | None:
    """Dense perplexity without and with BOS, and (ratio to dense without BOS, with BOS) for the unhealed and the
    healed 10% row, from the probe's points; None until they are measured (quality_report quotes them)."""
    results = load(path)
    picks = {"unhealed": (POSITIONS, "0"), "healed": ("lr1e-4x3", "100")}
    dense = results.get(POSITIONS, {}).get("dense", {})
    points = {k: results.get(v, {}).get(s) or {} for k, (v, s) in picks.items()}
    keys = ("nll_by_position", "nll_by_position_bos")
    if not all(k in p for p in (dense, *points.values()) for k in keys):
        return None
    out = {"dense": tuple(math.exp(sum(whole_window_nll(dense[k])) / len(dense[k])) for k in keys)}
    for name, point in points.items():
        out[name] = tuple(math.exp(paired(whole_window_nll(dense[k]), whole_window_nll(point[k]))[0]) for k in keys)
    return out


def best_on_bos(results: dict) -> list[str]:
    """The recipe and step of lowest perplexity on the windows started with BOS (the ones that count), against the
    unhealed model on the same windows, paired per window: among the recipes without user data (self-generated
    text), and separately among those distilled on user text (C4, WikiText-2 validation), which no user has."""
    dense = results.get(POSITIONS, {}).get("dense", {}).get("nll_by_position_bos")
    unhealed = results.get(POSITIONS, {}).get("0", {}).get("nll_by_position_bos")
    lines = []
    for user_text, label in ((False, "without user data"), (True, "distilled on user text")):
        points = [(name, step, whole_window_nll(p["nll_by_position_bos"])) for name, steps in results.items()
                  if name != POSITIONS and (name in DISTILL_TEXT) == user_text
                  for step, p in steps.items() if "nll_by_position_bos" in p]
        if dense and unhealed and points:
            lines += _best_line(label, dense, unhealed, min(points, key=lambda x: sum(x[2])))
    return lines


def _best_line(label: str, dense, unhealed, best_point) -> list[str]:
    name, step, best = best_point
    d_dense, d_unhealed = paired(whole_window_nll(dense), best), paired(whole_window_nll(unhealed), best)
    return ["", f"Lowest perplexity on the windows started with BOS, {label}: {name} at step {step}, "
                f"{math.exp(d_dense[0]):.3f}x dense (ΔNLL {d_dense[0]:+.3f} ± {d_dense[1]:.3f}); against the "
                f"unhealed model ΔNLL {d_unhealed[0]:+.3f} ± {d_unhealed[1]:.3f}, i.e. "
                f"{-d_unhealed[0] / paired(whole_window_nll(dense), whole_window_nll(unhealed))[0]:.0%} of the "
                "unhealed model's gap to dense closed."]


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def store(path: Path, variant: str, step: int, point: dict) -> None:
    from research.common import write_json

    results = load(path)
    results.setdefault(variant, {})[str(step)] = point
    write_json(path, results)


def cmd_run(args) -> int:
    known = {**VARIANTS, **INTERPOLATIONS, POSITIONS: None}
    names = args.only.split(",") if args.only else list(known)
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown variant {name!r}: {', '.join(known)}")
    for name in names:
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, __file__, "child", name, "--tasks", args.tasks,
                              "--results", str(args.results)])
        if rc:
            return rc
    return cmd_report(args)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    from research.common import mean_se

    return mean_se([y - x for x, y in zip(a, b)])


def cmd_report(args) -> int:
    results = load(args.results)
    quality = {(p["row"], p["budget"]): p for p in json.loads((REPO / "results" / "quality.json").read_text())["points"]}
    dense = quality[("dense", 0.0)]
    refs = {"unhealed (svd_llm/self/none)": quality[("svd_llm/self/none", BUDGET)],
            "healed, recorded (svd_llm/self/distill)": quality[("svd_llm/self/distill", BUDGET)]}
    tasks = [t for t in TASKS if any(t in p.get("zeroshot", {}) for v in results.values() for p in v.values())]
    lines = ["# Healing and zero-shot accuracy: which distillation recipe keeps it (quick probe, 10% of the decoder)",
             "", "Generated by `python research/experiments/heal_zeroshot.py report` from the points that "
             "`python research/experiments/heal_zeroshot.py run` measured. Do not edit by hand.", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             f"Dense: perplexity {dense['perplexity']['perplexity']:.2f}; "
             + ", ".join(f"{t} {dense['zeroshot']['acc'][t]:.3f}" for t in tasks) + ".", "",
             "| recipe | step | ppl / dense | ΔNLL vs dense ± SE | ppl / dense, BOS | ΔNLL vs dense, BOS ± SE | "
             + " | ".join(f"{t} Δacc vs dense ± SE | {t} Δacc vs unhealed ± SE" for t in tasks) + " | eval s |",
             "|---|---|---|---|---|---|" + "---|---|" * len(tasks) + "---|"]
    unhealed = refs["unhealed (svd_llm/self/none)"]
    # dense on the windows with BOS, as the probe measured it (quality.json's dense may predate BOS windows)
    dense_positions = results.get(POSITIONS, {}).get("dense", {})
    dense_bos = whole_window_nll(dense_positions["nll_by_position_bos"]) if "nll_by_position_bos" in dense_positions \
        else None

    def row(label, step, point):
        d_nll = paired(dense["perplexity"]["per_window_nll"], point["perplexity"]["per_window_nll"])
        cells = [label, str(step), f"{point['perplexity']['perplexity'] / dense['perplexity']['perplexity']:.3f}",
                 f"{d_nll[0]:+.4f} ± {d_nll[1]:.4f}"]
        bos = (whole_window_nll(point["nll_by_position_bos"]) if "nll_by_position_bos" in point
               else point["perplexity"].get("per_window_nll_bos"))
        if dense_bos and bos:
            m, se = paired(dense_bos, bos)
            cells += [f"{math.exp(m):.3f}", f"{m:+.4f} ± {se:.4f}"]
        else:
            cells += ["—", "—"]
        for t in tasks:
            docs = (point.get("zeroshot", {}).get(t) or {}).get("per_doc")
            if docs is None:
                cells += ["—", "—"]
                continue
            for ref in (dense, unhealed):
                m, se = paired([float(c) for c in ref["zeroshot"]["per_doc"][t]], [float(c) for c in docs])
                cells.append(f"{m:+.3f} ± {se:.3f}")
        cells.append(f"{point.get('seconds', 0):.0f}" if "seconds" in point else "")
        lines.append("| " + " | ".join(cells) + " |")

    for label, ref in refs.items():
        zs = {t: {"per_doc": ref["zeroshot"]["per_doc"][t]} for t in tasks}
        row(label, "—", {"perplexity": ref["perplexity"], "zeroshot": zs})
    for name, points in results.items():
        if name == POSITIONS:
            continue
        settings = {**VARIANTS, **INTERPOLATIONS}.get(name, ({}, ()))[0]
        for step in sorted(points, key=lambda k: (int(k.split("@")[0]), k)):
            label = f"{name} (Adam, constant lr {settings.get('lr', '?')}, {DISTILL_TEXT.get(name, 'self')} text)"
            if "@w" in step:
                label += f", factors {step.split('@w')[1]} of the way from unhealed to healed"
            row(label, step.split("@")[0], points[step])
    planned = [(n, str(s)) for n, (_, at) in VARIANTS.items() for s in at]
    planned += [(n, f"{c['steps']}@w{w:g}") for n, (c, ws) in INTERPOLATIONS.items() for w in ws]
    missing = [f"{n}@{s}" for n, s in planned if s not in results.get(n, {})]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    lines += best_on_bos(results)
    for key, title in (("nll_by_position", "as quality.md cuts them (all but the first start mid-text, without BOS)"),
                       ("nll_by_position_bos", "each started with BOS ([BOS] + its first 511 tokens)")):
        base = results.get(POSITIONS, {}).get("dense", {}).get(key)
        if not base:
            continue
        whole = whole_window_nll(base)
        lines += ["", f"## WikiText-2 NLL by position: windows {title}", "",
                  "Mean next-token NLL of the tokens predicted at positions [a, b) of the 32 windows, as the difference "
                  "from dense ± its paired SE (per window); the last column is the whole window as perplexity / "
                  "dense.",
                  "", "| model | " + " | ".join(f"positions {a}-{b}" for a, b in BUCKETS) + " | whole window |",
                  "|---|" + "---|" * (len(BUCKETS) + 1)]
        dense_mean = [sum(w[i] for w in base) / len(base) for i in range(len(BUCKETS))]
        lines.append("| dense (mean NLL; perplexity) | " + " | ".join(f"{m:.3f}" for m in dense_mean)
                     + f" | {math.exp(sum(whole) / len(whole)):.2f} |")
        for name, points in results.items():
            for step in sorted(points, key=lambda k: (k != "dense", int(k.split("@")[0]) if k[0].isdigit() else 0)):
                nll = points[step].get(key)
                if not nll or step == "dense":
                    continue
                cells = []
                for i in range(len(BUCKETS)):
                    m, se = paired([w[i] for w in base], [w[i] for w in nll])
                    cells.append(f"{m:+.3f} ± {se:.3f}")
                m, se = paired(whole, whole_window_nll(nll))
                cells.append(f"{math.exp(m):.3f}x (ΔNLL {m:+.3f} ± {se:.3f})")
                label = "unhealed (step 0)" if name == POSITIONS else f"{name} step {step}"
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Step 0 is the unhealed model: its per-window NLL equal to the unhealed record's shows the probe "
              "rebuilt the same model."]
    Path(str(args.results).replace(".json", ".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("run", "report", "child"))
    ap.add_argument("variant", nargs="?")
    ap.add_argument("--only")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--results", type=Path, default=OUT.with_suffix(".json"))
    args = ap.parse_args(argv)
    if args.command == "child":
        child(args.variant, [t for t in args.tasks.split(",") if t], args.results)
        return 0
    return {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
