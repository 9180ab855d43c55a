"""Every decomposition method and the paper's presets on Gemma-3-270M at 5/10/20/30% decoder-parameter reduction.

    python research/bench/methods_compare.py run [--only NAME,...] [--budgets 0.05,0.1] [--max-minutes 14]
    python research/bench/methods_compare.py zeroshot --only NAME,... --budgets 0.2   # adds zero-shot to measured points
    python research/bench/methods_compare.py report          # results/methods.md + methods.png from results/methods.json

`run` is resumable: each (row, budget) point is appended to results/methods.json as soon as it is measured and
skipped when present, so the sweep runs in pieces of at most --max-minutes (run each piece under
`flock -s /tmp/jointrank-cpu.lock`). Per point: fresh model, plan, compress (timed), then
  * WikiText-2 test perplexity on the first WINDOWS windows of SEQLEN tokens (jointrank.evaluate.perplexity, the
    same windows for every point), with a standard error from the spread of the per-window mean NLL;
  * (`zeroshot`, only for the points asked for: it costs ~10x the perplexity probe on this machine) zero-shot
    accuracy on seeded subsets of ZS_LIMIT documents of ZS_TASKS (jointrank.evaluate.evaluate, seed 1234: the same
    documents for every point), averaged; its standard error combines the tasks' (lm-eval's).
Compress time is one run on a shared, overloaded 2-core machine (global allocation: spectra included, cached
between budgets of one process); treat it as indicative only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script (python research/bench/...): make `research` importable
    sys.path.insert(0, str(REPO))
OUT_JSON = REPO / "results" / "methods.json"
OUT_MD = REPO / "results" / "methods.md"
OUT_PNG = REPO / "results" / "methods.png"

MODEL = "gemma-3-270m"
BUDGETS = (0.05, 0.10, 0.20, 0.30)
SEQLEN, WINDOWS = 512, 4
# the paper's seven; seeded samples are nested, so these 100 documents per task are among the baseline's 1000
ZS_TASKS = ("piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "arc_easy", "arc_challenge")
ZS_LIMIT = 100
CAL_TOKENS, CAL_SEQLEN, CAL_SEED = 4096, 512, 0
DATA = Path(os.environ.get("JOINTRANK_DATA", REPO.parent / "shared" / "data"))
CALIBRATION_FILE = DATA / "c4_calibration" / "exllamav2_c4.utf8"

ALL = {"qk": "joint", "gate_up": "joint", "v": "separate", "o": "separate", "down": "separate"}
SEPARATE = {"qk": "separate", "gate_up": "separate", "v": "separate", "o": "separate", "down": "separate"}

# name -> (structure: group rules or a preset name, method, allocation, allocation prior, what it is)
ROWS = {
    "paper-10": ("paper-10", "svd", "uniform", None,
                 "paper preset structure: separate rank-k on W_Q, W_K of every layer"),
    "paper-20": ("paper-20", "svd", "uniform", None,
                 "paper preset structure: + joint W_gate/W_up on the last 22/32 of the layers"),
    "joint-svd": (ALL, "svd", "uniform", None,
                  "the paper's plain joint method on every matrix: joint Q/K and gate/up, separate V, O, down; one ratio"),
    "balanced": (ALL, "balanced:norm", "uniform", None, "joint members weighted by 1/norm before stacking; one ratio"),
    "balanced-heads": (ALL, "balanced:heads", "uniform", None, "joint members weighted by head count; one ratio"),
    "global-svd": (ALL, "svd", "global", "flat", "plain joint SVD, ranks by global data-free allocation"),
    "global-balanced": (ALL, "balanced:norm", "global", "flat", "balanced joint SVD, global allocation"),
    "global-balanced-depth": (ALL, "balanced:norm", "global", "depth",
                              "balanced joint SVD, global allocation with the depth prior"),
    "global-balanced-residual": (ALL, "balanced:norm", "global", "residual",
                                 "balanced joint SVD, global allocation with the residual-stream prior"),
    "qk-balanced": ({"qk": "joint"}, "balanced:norm", "uniform", None,
                    "joint Q/K only (the paper-10 matrices), weighted by 1/norm before stacking; one ratio"),
    "global-qk-balanced": ({"qk": "joint"}, "balanced:norm", "global", "flat",
                           "joint Q/K only, balanced, ranks by global allocation across layers"),
    "global-paper-10": ("paper-10", "svd", "global", "flat",
                        "the paper-10 structure (separate W_Q, W_K), ranks by global allocation across layers"),
    "global-paper-20": ("paper-20", "svd", "global", "flat",
                        "the paper-20 structure, ranks by global allocation across layers and groups"),
    "asvd": (ALL, "asvd", "uniform", None, "ASVD, joint units share one scaling; one ratio"),
    "svd_llm": (ALL, "svd_llm", "uniform", None, "SVD-LLM whitening, joint units share one whitening; one ratio"),
    "svd_llm-separate": (SEPARATE, "svd_llm", "uniform", None, "SVD-LLM as published: every matrix on its own"),
    "llm_rom": (ALL, "llm_rom", "uniform", None, "LLM-ROM output PCA, sequential, joint units; one ratio"),
    "llm_rom-separate": (SEPARATE, "llm_rom", "uniform", None, "LLM-ROM as published: every matrix on its own"),
    "global-llm_rom": (ALL, "llm_rom", "global", "flat",
                       "LLM-ROM, joint units, module-wise budgets from the data-free global allocation"),
    "global-svd_llm": (ALL, "svd_llm", "global", "flat",
                       "SVD-LLM, joint units, module-wise budgets from the data-free global allocation"),
}
DATA_FREE = ("paper-10", "paper-20", "joint-svd", "balanced", "balanced-heads", "global-svd", "global-balanced",
             "global-balanced-depth", "global-balanced-residual", "qk-balanced", "global-qk-balanced", "global-paper-10", "global-paper-20")


def config_for(name: str, budget: float):
    from jointrank import PRESETS, GroupRule, JointRankConfig

    structure, method, allocation, prior, _ = ROWS[name]
    if isinstance(structure, str):
        rules = dict(PRESETS[structure].rules)
    else:
        rules = {g: GroupRule(m) for g, m in structure.items()}
    return JointRankConfig(rules=rules, target=budget, scope="decoder", method=method, allocation=allocation,
                           preset=structure if isinstance(structure, str) else None,
                           allocation_prior=prior or "flat")


def plan(model, name: str, budget: float):
    from jointrank import plan_for

    # global allocation reads every unit's spectrum; the weights are the same for every budget, so cache them
    return plan_for(model, config_for(name, budget), spectra=_SPECTRA.setdefault(ROWS[name][1], {}))


_SPECTRA: dict[str, dict] = {}  # method -> unit -> spectrum: the weights are the same for every budget


def measure_perplexity(model, tokenizer) -> dict:
    from jointrank.evaluate import data
    from jointrank.evaluate.perplexity import load_text, make_windows, window_nll

    text = load_text("wikitext2", data.resolve_data_dir(str(DATA)))
    windows = make_windows(tokenizer(text, return_tensors="pt").input_ids[0], SEQLEN, WINDOWS)
    per_window = []
    for row in windows:
        nll, count = window_nll(model, row.unsqueeze(0))
        per_window.append(nll / count)
    n = len(per_window)
    mean = sum(per_window) / n
    se = (sum((x - mean) ** 2 for x in per_window) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    # delta method: se(exp(m)) ≈ exp(m)·se(m)
    return {"perplexity": math.exp(mean), "perplexity_se": math.exp(mean) * se, "mean_nll": mean, "windows": n,
            "seqlen": SEQLEN, "per_window_nll": per_window,
            "windows_available": len(tokenizer(text, return_tensors="pt").input_ids[0]) // SEQLEN}


def measure_zeroshot(model, tokenizer) -> dict:
    from jointrank.evaluate import evaluate

    res = evaluate(model, tokenizer, list(ZS_TASKS), data_dir=str(DATA), limit=ZS_LIMIT, progress=False)["results"]
    accs = {t: res[t]["acc"] for t in ZS_TASKS}
    ses = {t: res[t].get("acc_stderr") for t in ZS_TASKS}
    avg = sum(accs.values()) / len(accs)
    avg_se = (sum(s**2 for s in ses.values() if s is not None) ** 0.5) / len(accs)
    per_doc = {t: res[t].get("per_doc", {}).get("acc") for t in ZS_TASKS}
    return {"acc": accs, "acc_se": ses, "avg": avg, "avg_se": avg_se, "limit": ZS_LIMIT, "per_doc": per_doc}


def load_results() -> dict:
    if OUT_JSON.is_file():
        return json.loads(OUT_JSON.read_text())
    return {"settings": settings(), "baseline": None, "points": []}


def settings() -> dict:
    return {"model": MODEL, "budgets": list(BUDGETS), "scope": "decoder", "perplexity": {
        "text": "wikitext-2-raw test", "seqlen": SEQLEN, "windows": WINDOWS, "which": "the first WINDOWS windows"},
        "zeroshot": {"tasks": list(ZS_TASKS), "limit": ZS_LIMIT, "seed": 1234},
        "calibration": {"file": str(CALIBRATION_FILE.relative_to(DATA.parent)) if CALIBRATION_FILE.is_relative_to(
            DATA.parent) else str(CALIBRATION_FILE), "tokens": CAL_TOKENS, "seqlen": CAL_SEQLEN, "seed": CAL_SEED},
        "rows": {k: {"structure": v[0], "method": v[1], "allocation": v[2], "prior": v[3], "what": v[4]}
                 for k, v in ROWS.items()}}


def save_results(results: dict) -> None:
    from research.common import write_json

    write_json(OUT_JSON, results)


def cmd_run(args) -> int:
    from jointrank import JointRankError, compress_
    from jointrank.methods import parse
    from jointrank.methods.calibration import load_text
    from jointrank.sources import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    deadline = time.monotonic() + args.max_minutes * 60
    results = load_results()
    results["settings"] = settings()
    names = args.only.split(",") if args.only else list(ROWS)
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(BUDGETS)
    done = {(p["row"], p["budget"]) for p in results["points"]}

    model, tokenizer, _ = load_model(MODEL)
    if results.get("baseline") is None:
        t = time.perf_counter()
        results["baseline"] = {"perplexity": measure_perplexity(model, tokenizer),
                               "params_decoder": sum(p.numel() for p in model.model.layers.parameters()),
                               "eval_seconds": time.perf_counter() - t}
        save_results(results)
        print(f"baseline: ppl {results['baseline']['perplexity']['perplexity']:.3f}", flush=True)
    calibration = load_text(CALIBRATION_FILE, tokenizer, tokens=CAL_TOKENS, seqlen=CAL_SEQLEN, seed=CAL_SEED)

    def fresh():
        m, _, _ = load_model(MODEL)
        return m

    for budget in budgets:
        for name in names:
            if (name, budget) in done:
                continue
            if time.monotonic() > deadline:
                print("time budget of this piece used up; run again to continue", flush=True)
                return 3
            model = fresh()
            try:
                p = plan(model, name, budget)
            except JointRankError as exc:  # e.g. the paper-10 structure cannot remove 20%
                results["points"].append({"row": name, "budget": budget, "infeasible": str(exc)})
                save_results(results)
                print(f"{name} @ {budget:.0%}: infeasible ({exc})", flush=True)
                continue
            method, _ = parse(p.config["method"])
            t = time.perf_counter()
            result = compress_(model, p, progress=False, calibration=calibration if method.needs_calibration else None)
            seconds = time.perf_counter() - t
            t = time.perf_counter()
            point = {
                "row": name, "budget": budget,
                "params_decoder_before": result.params_decoder_before,
                "params_decoder_after": result.params_decoder_after,
                "decoder_reduction": 1 - result.params_decoder_after / result.params_decoder_before,
                "params_total_after": result.params_total_after,
                "units_factorised": len(result.units),
                "units_kept_dense": sum(1 for e in p.entries if e.structure == "keep" and e.note),
                "ranks": [[e.layer, e.group, "+".join(m.rsplit(".", 1)[1] for m in e.members), e.rank]
                          for e in p.entries if e.structure != "keep"],
                "ratio": p.ratio,
                "compress_seconds": seconds,
                "calibration_tokens": calibration.tokens if method.needs_calibration else 0,
                "perplexity": measure_perplexity(model, tokenizer),
            }
            if result.extra.get("calibration_errors"):
                rows = result.extra["calibration_errors"]
                point["calib_rel_error_mean"] = sum(r["calib_rel_error"] for r in rows) / len(rows)
                point["svd_calib_rel_error_mean"] = sum(r["svd_calib_rel_error"] for r in rows) / len(rows)
            point["eval_seconds"] = time.perf_counter() - t
            point["load_avg_1min"] = os.getloadavg()[0]
            results["points"].append(point)
            save_results(results)
            print(f"{name} @ {budget:.0%}: removed {point['decoder_reduction']:.3%}, ppl "
                  f"{point['perplexity']['perplexity']:.3f}, "
                  f"compress {seconds:.1f}s, eval {point['eval_seconds']:.0f}s", flush=True)
            del model
    print("all requested points are measured", flush=True)
    return 0


def cmd_zeroshot(args) -> int:
    """Zero-shot for measured points (recompressed: every method is deterministic) and the dense baseline."""
    from jointrank import compress_
    from jointrank.methods import parse
    from jointrank.methods.calibration import load_text
    from jointrank.sources import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    deadline = time.monotonic() + args.max_minutes * 60
    results = load_results()
    names = args.only.split(",") if args.only else []
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(BUDGETS)
    model, tokenizer, _ = load_model(MODEL)
    if args.baseline and "zeroshot" not in (results.get("baseline") or {}):
        results["baseline"]["zeroshot"] = measure_zeroshot(model, tokenizer)
        save_results(results)
        print(f"baseline zero-shot avg {results['baseline']['zeroshot']['avg']:.4f}", flush=True)
    calibration = load_text(CALIBRATION_FILE, tokenizer, tokens=CAL_TOKENS, seqlen=CAL_SEQLEN, seed=CAL_SEED)
    for point in results["points"]:
        if point["row"] not in names or point["budget"] not in budgets or "zeroshot" in point or "infeasible" in point:
            continue
        if time.monotonic() > deadline:
            print("time budget of this piece used up; run again to continue", flush=True)
            return 3
        model, _, _ = load_model(MODEL)
        p = plan(model, point["row"], point["budget"])
        method, _ = parse(p.config["method"])
        result = compress_(model, p, progress=False, calibration=calibration if method.needs_calibration else None)
        assert result.params_decoder_after == point["params_decoder_after"]  # the same compressed model
        point["zeroshot"] = measure_zeroshot(model, tokenizer)
        save_results(results)
        print(f"{point['row']} @ {point['budget']:.0%}: zero-shot avg {point['zeroshot']['avg']:.4f}", flush=True)
    return 0


def cmd_report(args) -> int:
    from research.bench.report_methods import write_report

    write_report(load_results(), OUT_MD, OUT_PNG, command=" ".join(["python", "research/bench/methods_compare.py", *sys.argv[1:]]))
    print(f"wrote {OUT_MD.relative_to(REPO)} and {OUT_PNG.relative_to(REPO)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--only", default=None, help="comma-separated row names (default: all)")
    run.add_argument("--budgets", default=None, help="comma-separated fractions (default: 0.05,0.1,0.2,0.3)")
    run.add_argument("--max-minutes", type=float, default=14.0, help="stop starting new points after this long")
    run.set_defaults(func=cmd_run)
    zs = sub.add_parser("zeroshot")
    zs.add_argument("--only", default="", help="comma-separated row names")
    zs.add_argument("--budgets", default=None)
    zs.add_argument("--baseline", action="store_true", help="also the dense model")
    zs.add_argument("--max-minutes", type=float, default=14.0)
    zs.set_defaults(func=cmd_zeroshot)
    report = sub.add_parser("report")
    report.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
