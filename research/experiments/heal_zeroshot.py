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
    "lr1e-4": ({"steps": 100, "lr": 1e-4}, (0, 16, 32, 100)),  # quality.md's recipe (step 100) and its prefixes
    "lr3e-5": ({"steps": 100, "lr": 3e-5}, (32, 100)),
    "lr1e-5": ({"steps": 100, "lr": 1e-5}, (100,)),
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
    settings, at = VARIANTS[variant]
    settings = DistillSettings(**settings)
    done = load(results_path).get(variant, {})
    model, tokenizer, _ = load_model(Q.P.model)
    calibration = self_calibration(model, tokenizer, Q.CAL_TOKENS, cache_dir=Q.CACHE, progress=False)
    ids = calibration.input_ids
    states = teacher_states(model, ids, _window_order(int(ids.shape[0]), settings.steps, settings.seed),
                            progress=False)
    plan = plan_for(model, Q.config_for(ROW, BUDGET), calibration=calibration, progress=False)
    compress_(model, plan, progress=False, calibration=calibration)

    def measure(step: int) -> None:
        if str(step) in done:
            return
        t = time.perf_counter()
        with torch.no_grad():
            point = {"perplexity": Q.measure_perplexity(model, tokenizer)}
            if tasks:
                res = evaluate(model, tokenizer, tasks, data_dir=str(Q.DATA), limit=Q.P.zs_limit,
                               progress=False)["results"]
                point["zeroshot"] = {t_: {"acc": res[t_]["acc"], "per_doc": res[t_]["per_doc"]["acc"]}
                                     for t_ in tasks}
        point["seconds"] = time.perf_counter() - t
        done[str(step)] = point
        store(results_path, variant, step, point)
        print(f"{variant} step {step}: ppl {point['perplexity']['perplexity']:.3f} "
              + " ".join(f"{t_} {v['acc']:.3f}" for t_, v in point.get("zeroshot", {}).items()), flush=True)

    if 0 in at:
        measure(0)
    last = max(at)
    if all(str(s) in done for s in at):
        return
    distill_(model, states, ids, DistillSettings(**{**settings.__dict__, "steps": last}), progress=False,
             on_step=lambda step, loss: measure(step) if step in at else None)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def store(path: Path, variant: str, step: int, point: dict) -> None:
    from research.common import write_json

    results = load(path)
    results.setdefault(variant, {})[str(step)] = point
    write_json(path, results)


def cmd_run(args) -> int:
    names = args.only.split(",") if args.only else list(VARIANTS)
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: {', '.join(VARIANTS)}")
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
             "| recipe | step | ppl / dense | ΔNLL vs dense ± SE | " + " | ".join(
                 f"{t} Δacc vs dense ± SE | {t} Δacc vs unhealed ± SE" for t in tasks) + " | eval s |",
             "|---|---|---|---|" + "---|---|" * len(tasks) + "---|"]
    unhealed = refs["unhealed (svd_llm/self/none)"]

    def row(label, step, point):
        d_nll = paired(dense["perplexity"]["per_window_nll"], point["perplexity"]["per_window_nll"])
        cells = [label, str(step), f"{point['perplexity']['perplexity'] / dense['perplexity']['perplexity']:.3f}",
                 f"{d_nll[0]:+.4f} ± {d_nll[1]:.4f}"]
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
        settings = VARIANTS.get(name, ({}, ()))[0]
        for step in sorted(points, key=int):
            row(f"{name} (Adam, constant lr {settings.get('lr', '?')})", step, points[step])
    missing = [f"{n}@{s}" for n, (_, at) in VARIANTS.items() for s in at if str(s) not in results.get(n, {})]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
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
