"""Which settings can a user of the small demo model afford? Perplexity (and optionally zero-shot) per setting.

    python research/bench/demo_settings.py --data-dir ../shared/data --max-windows 8 --out results/demo_settings

Writes OUT.json and OUT.md (generated from the JSON; the command that made them is recorded in both). Every setting
is compressed from the same dense model in the same process, so the numbers compare like with like.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import jointrank
from jointrank import PRESETS, GroupRule, JointRankConfig
from jointrank.evaluate import evaluate
from jointrank.sources import load_model
from jointrank.tables import format_table

SETTINGS = {
    "paper-10 (decoder scope)": dataclasses.replace(PRESETS["paper-10"], scope="decoder"),
    "paper-20 (decoder scope)": dataclasses.replace(PRESETS["paper-20"], scope="decoder"),
    "paper-10 (model scope)": PRESETS["paper-10"],
    "qk separate, 5% of decoder": JointRankConfig(rules={"qk": GroupRule("separate")}, target=0.05, scope="decoder"),
    "qk joint, 5% of decoder": JointRankConfig(rules={"qk": GroupRule("joint")}, target=0.05, scope="decoder"),
    "qk joint, 10% of decoder": JointRankConfig(rules={"qk": GroupRule("joint")}, target=0.10, scope="decoder"),
    "gate_up joint last 6 layers, 5% of decoder": JointRankConfig(rules={"gate_up": GroupRule("joint", "last:6")},
                                                                  target=0.05, scope="decoder"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tasks", default="wikitext2")
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated substrings of setting names to run")
    parser.add_argument("--out", default="results/demo_settings")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    model, tokenizer, _ = load_model(args.model)
    kw = dict(data_dir=args.data_dir, max_windows=args.max_windows, limit=args.limit, progress=False)
    rows = [{"setting": "dense", **_measure(model, tokenizer, args.tasks, kw), "params": None}]
    print(rows[-1], flush=True)
    for name, config in SETTINGS.items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        work = copy.deepcopy(model)
        try:
            result = jointrank.compress_(work, config, progress=False)
        except jointrank.JointRankError as exc:
            rows.append({"setting": name, "error": str(exc)})
            continue
        rows.append({"setting": name, **_measure(work, tokenizer, args.tasks, kw), "compress_s": result.seconds,
                     "ratio": result.plan.ratio, "params": result.to_dict()["params"]})
        print(rows[-1], flush=True)
        del work
    doc = {"command": command, "model": args.model, "tasks": args.tasks, "max_windows": args.max_windows,
           "limit": args.limit, "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(doc))
    print(render(doc))


def _measure(model, tokenizer, tasks, kw) -> dict:
    start = time.perf_counter()
    res = evaluate(model, tokenizer, tasks, **kw)
    return {"eval": res["results"], "eval_s": time.perf_counter() - start}


def render(doc: dict) -> str:
    table = []
    dense = doc["rows"][0]["eval"].get("wikitext2", {}).get("perplexity")
    for row in doc["rows"]:
        if "error" in row:
            table.append([row["setting"], "-", "-", "-", "-", f"not possible: {row['error']}"])
            continue
        ppl = row["eval"].get("wikitext2", {}).get("perplexity")
        p = row.get("params")
        dec = f"{1 - p['decoder_after'] / p['decoder_before']:.1%}" if p else "0%"
        whole = f"{1 - p['total_after'] / p['total_before']:.1%}" if p else "0%"
        ratio = f"{row['ratio']:.3f}" if row.get("ratio") is not None else "-"
        table.append([row["setting"], dec, whole, ratio, f"{ppl:.2f}" if ppl else "-",
                      f"{ppl / dense:.2f}x" if ppl and dense else "-"])
    return (
        f"# What the demo model can afford\n\nModel: `{doc['model']}`. WikiText-2 test perplexity on the first "
        f"{doc['max_windows']} windows of 2048 tokens (a slice, not the full split; the same slice for every row).\n\n"
        f"Command:\n\n```\n{doc['command']}\n```\n\n"
        + format_table(["setting", "decoder params removed", "whole-model params removed", "approx. ratio",
                        "WikiText-2 ppl", "vs dense"], table, markdown=True)
        + "\n"
    )


if __name__ == "__main__":
    main()
