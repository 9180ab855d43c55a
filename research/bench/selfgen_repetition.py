"""How much of each model's self-generated calibration text is degenerate repetition.

    python research/bench/selfgen_repetition.py [--models smollm2-135m,...] [--cache DIR]

Healing on self-generated text trains the compressed model on what the dense model samples (temperature 1.0, top-p
0.95, from a bare BOS). A model that falls into loops ("a, a, a, ...") hands healing windows that teach nothing
about language. Per window: the share of its 4-grams that repeat an earlier 4-gram of the same window (0 for text
that never repeats itself, near 1 for a loop). Each model is loaded to compute the fingerprint its cache file is
keyed by (selfgen.fingerprint); the cached text is read, never sampled here. Writes
results/scale/selfgen_repetition.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `research` importable
    sys.path.insert(0, str(REPO))

from jointrank.methods.selfgen import LOOP_SHARE as LOOP  # noqa: E402
from jointrank.methods.selfgen import repeated_ngram_share  # noqa: E402
from research.bench.quality import CACHE  # noqa: E402
from research.bench.scale import MODELS  # noqa: E402

OUT = REPO / "results" / "scale" / "selfgen_repetition.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--cache", type=Path, default=CACHE, help="where quality.py keeps self-generated text")
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:  # before loading anything
        raise SystemExit(f"unknown model {unknown[0]!r}: one of {', '.join(MODELS)}")
    from safetensors import safe_open

    from jointrank.methods.selfgen import fingerprint
    from jointrank.sources import load_model

    files = {}  # fingerprint -> [(file, its sampling metadata)]
    for f in sorted(args.cache.glob("selfgen-*.safetensors")):
        with safe_open(str(f), "pt") as g:
            meta = json.loads(g.metadata()["jointrank_selfgen"])
        files.setdefault(meta["fingerprint"], []).append((f, meta))
    out = {"command": "python research/bench/selfgen_repetition.py " + " ".join(argv or sys.argv[1:]),
           "loop_threshold": LOOP, "models": {}}
    for name in args.models.split(","):
        model, _, _ = load_model(name)
        key = fingerprint(model)
        del model
        for f, meta in files.get(key, []):
            with safe_open(str(f), "pt") as g:
                ids = g.get_tensor("input_ids")
            shares = [repeated_ngram_share(w.tolist()) for w in ids]
            rec = {"file": f.name, "windows": len(shares), "median_share": statistics.median(shares),
                   "loop_windows": sum(s > LOOP for s in shares),
                   # the loop guard and document isolation settings exist only in files sampled with them
                   "sampling": {k: meta[k] for k in ("temperature", "top_p", "seed", "seqlen", "loop_window",
                                                     "loop_share", "isolate_documents", "loop_restarts") if k in meta}}
            out["models"].setdefault(name, []).append(rec)
            print(f"{name}: {rec['windows']} windows, median repeated 4-gram share {rec['median_share']:.2f}, "
                  f"{rec['loop_windows']} loops (> {LOOP:.0%})", flush=True)
        if key not in files:
            print(f"{name}: no self-generated text cached in {args.cache}", flush=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
