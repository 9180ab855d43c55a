"""What a healed point of the scale study would cost on each model, measured with a few steps before spending hours.

    python research/bench/heal_probe.py [--models gemma-3-270m,qwen2.5-coder-1.5b] [--steps 3]

One process per model: the model compressed with paper-20 at 20% of the decoder (data-free: minutes), the dense
model's states on 4 seeded random-token windows of 512 (heal.teacher_states: one forward per window, timed), then
`--steps` distillation steps as the scale study heals (DistillSettings' defaults: float32 factors, the head's
matmuls in bfloat16). Recorded per model: seconds per step (median of the steps after the first, which also
allocates Adam's moments), seconds per teacher window, the peak RSS during distillation and the RSS it started
from, and the factor parameters trained (`jointrank plan` prints their optimiser memory). Merged per model into
results/scale/heal_probe.json; `scale.py report` estimates the healed points not yet measured from it. Step times
are a probe's, not a timing verdict: run it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `research` importable
    sys.path.insert(0, str(REPO))

from research.bench.quality import PeakRSS  # noqa: E402

OUT = REPO / "results" / "scale" / "heal_probe.json"
WINDOWS, SEQLEN = 4, 512


def probe(model_name: str, steps: int) -> dict:
    """The measurement itself, in this process."""
    import torch

    from jointrank import PRESETS, JointRankConfig, compress_
    from jointrank.heal import DistillSettings, distill_, teacher_states, trainable_factors
    from jointrank.sources import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, _, _ = load_model(model_name)
    ids = torch.randint(10, 20000, (WINDOWS, SEQLEN), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    states = teacher_states(model, ids, progress=False)
    teacher_window = (time.perf_counter() - t) / WINDOWS
    compress_(model, JointRankConfig(rules=dict(PRESETS["paper-20"].rules), target=0.2, scope="decoder",
                                     preset="paper-20"), progress=False)
    trainable = sum(p.numel() for _, p in trainable_factors(model))  # what `jointrank plan` prints beside its GiB
    peaks = PeakRSS()
    peaks.end("compress")  # resets the peak to the current RSS (Linux): what follows is distillation's own peak
    start = PeakRSS._hwm()  # just reset: the RSS distillation starts from
    stamps = [time.perf_counter()]
    report = distill_(model, states, ids, DistillSettings(steps=steps), progress=False,
                      on_step=lambda step, loss: stamps.append(time.perf_counter()))
    step_seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    peaks.end("distill")
    return {"model": model_name, "steps": steps, "step_seconds": step_seconds,
            "seconds_per_step": statistics.median(step_seconds[1:] or step_seconds),
            "teacher_seconds_per_window": teacher_window, "distill_peak_rss_gib": peaks.own.get("distill"),
            "trainable_factor_params": trainable, "rss_at_distill_start_gib": start, "losses": report.losses,
            "load_avg_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> int:
    from jointrank.zoo import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma-3-270m,qwen2.5-coder-1.5b",
                        help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=3, help="distillation steps per model (>= 2: the first is "
                        "not timed into the median)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this model, print its JSON
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(probe(args.one, args.steps)))
        return 0
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}: one of {', '.join(MODELS)}")
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is not timed into the median)")
    done = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for model in models:
        print(f"probing {model} ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--one", model, "--steps", str(args.steps)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{model}: the probe failed: {out.stderr.strip().splitlines()[-1:]}")
        row = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        row["command"] = f"python research/bench/heal_probe.py --models {model} --steps {args.steps}"
        done[model] = row
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(done, indent=1) + "\n")
        print(f"  {row['seconds_per_step']:.1f} s/step, {row['teacher_seconds_per_window']:.1f} s per teacher "
              f"window, distillation peak {row['distill_peak_rss_gib']:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
