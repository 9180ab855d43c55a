"""How much of each model's self-generated calibration text is degenerate repetition, before and with the guards.

    python research/bench/selfgen_repetition.py [--models smollm2-135m,...] [--cache DIR]

Healing on self-generated text trains the compressed model on what the dense model samples (temperature 1.0, top-p
0.95, from a bare BOS). A model that falls into loops ("a, a, a, ...") hands healing windows that teach nothing
about language. Per window: the share of its 4-grams that repeat an earlier 4-gram of the same window (0 for text
that never repeats itself, near 1 for a loop). Per model, the calibration text quality.py uses (CAL_TOKENS, seed 0)
sampled two ways: as before the guards (documents see the earlier documents of their window, no loop guard, no
redrawing) and with jointrank's default settings (src/jointrank/methods/selfgen.py). Text already in the cache
(the one quality.py uses) is read, not sampled again; sampling is seeded, so a rerun reproduces the same text.
Resumable: each model's record is written as soon as it is measured. Writes results/scale/selfgen_repetition.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `research` importable
    sys.path.insert(0, str(REPO))

from jointrank.methods.selfgen import LOOP_SHARE, SamplingSettings  # noqa: E402
from research.bench.quality import CACHE, CAL_TOKENS  # noqa: E402
from research.bench.scale import MODELS  # noqa: E402

OUT = REPO / "results" / "scale" / "selfgen_repetition.json"
# the settings before 2026-12-07: their cache key is the one written then (SamplingSettings.cache_key)
WAYS = {"before the guards": SamplingSettings(isolate_documents=False, loop_window=0, max_repeated_share=1.0),
        "with the guards (default)": SamplingSettings()}
REPORTED = ("loop_windows", "median_repeated_4gram_share", "loop_restarts", "windows_redrawn", "from_cache",
            "sampling_seconds")


def measure(name: str, cache: Path) -> dict:
    """Both ways of sampling one model: what the provenance of its calibration text says about repetition."""
    import torch

    from jointrank.methods.selfgen import self_calibration
    from jointrank.sources import load_model

    torch.set_num_threads(2)
    model, tokenizer, _ = load_model(name)
    out = {}
    for way, settings in WAYS.items():
        prov = self_calibration(model, tokenizer, CAL_TOKENS, settings=settings, cache_dir=cache,
                                progress=False).provenance
        out[way] = {"windows": prov["windows"], **{k: prov[k] for k in REPORTED if k in prov},
                    "cache_file": Path(prov["cache_file"]).name}
        print(f"{name}, {way}: {prov['loop_windows']} of {prov['windows']} windows loops (over {LOOP_SHARE:.0%} "
              f"of 4-grams repeated), median share {prov['median_repeated_4gram_share']:.2f}"
              + (f", {prov['loop_restarts']} loops ended" if "loop_restarts" in prov else "")
              + (f", {prov['windows_redrawn']} windows redrawn" if "windows_redrawn" in prov else ""), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--cache", type=Path, default=CACHE, help="where quality.py keeps self-generated text")
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:  # before loading anything
        raise SystemExit(f"unknown model {unknown[0]!r}: one of {', '.join(MODELS)}")
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    out = {"command": "python research/bench/selfgen_repetition.py", "loop_threshold": LOOP_SHARE,
           "calibration_tokens": CAL_TOKENS, "ways": {way: s.cache_key() for way, s in WAYS.items()},
           "models": {m: r for m, r in old.get("models", {}).items() if isinstance(r, dict) and set(r) == set(WAYS)}}
    for name in args.models.split(","):
        if name in out["models"]:
            print(f"{name}: measured (in {OUT.relative_to(REPO)})", flush=True)
            continue
        out["models"][name] = measure(name, args.cache)
        OUT.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
