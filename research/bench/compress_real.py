"""Compress speed on real weights: `jointrank compress --stream` against the in-memory path, on a named model.

    python research/bench/compress_real.py --model qwen2.5-coder-1.5b     # adds a section to results/compress_speed.md

Each path is the command a user types, run in its own child process so wall time and peak RSS (the child's
ru_maxrss) are its own: `jointrank compress MODEL --preset paper-20 --scope decoder --out DIR [--stream]`, the
paper's data-free structure (separate rank-k Q and K in every layer, joint gate/up in the last 22/32) solved for 20%
of the decoder parameters. The model is the zoo's materialised float32 safetensors directory (resolved once before
timing, so neither path pays for assembling or dequantising the GGUF). The two checkpoints are then compared tensor
by tensor: streaming must write the very bytes the in-memory path writes. Results: results/compress_speed_real.json,
rendered into results/compress_speed.md by research/bench/compress_speed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT_JSON = REPO / "results" / "compress_speed_real.json"
CHILD = """
import resource, sys, time
from jointrank.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print("JOINTRANK_BENCH", code, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _status_kib(pid: int) -> dict:
    """RssAnon and RssFile of a running process, KiB (empty once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(line.split()[1]) for line in text.splitlines() for k in ("RssAnon", "RssFile")
            if line.startswith(k + ":")}


def run_path(model_dir: str, out: Path, stream: bool, threads: int) -> dict:
    """One path in a child process. Peak RSS (the kernel's high-water mark) counts the pages of memory-mapped
    safetensors files the child has read, which the kernel can drop at will; the parent therefore also samples the
    child's anonymous memory (RssAnon: what must fit in RAM) every 50 ms and keeps its maximum."""
    args = ["compress", model_dir, "--preset", "paper-20", "--scope", "decoder", "--out", str(out)]
    args += ["--stream"] * stream
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        child = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=out_f, stderr=err_f, text=True,
                                 env=env)
        peak_anon = peak_file = 0
        while child.poll() is None:
            kib = _status_kib(child.pid)
            peak_anon, peak_file = max(peak_anon, kib.get("RssAnon", 0)), max(peak_file, kib.get("RssFile", 0))
            time.sleep(0.05)
        out_f.seek(0), err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    marker = [line for line in stdout.splitlines() if line.startswith("JOINTRANK_BENCH")]
    if child.returncode != 0 or not marker or marker[-1].split()[1] != "0":
        raise SystemExit(f"jointrank {' '.join(args)} failed:\n{stderr[-3000:]}")
    _, _, seconds, maxrss_kib = marker[-1].split()
    return {"command": "jointrank " + " ".join(shlex.quote(a) for a in args), "wall_seconds": float(seconds),
            "peak_rss_gib": int(maxrss_kib) / 2**20, "peak_anon_gib": peak_anon / 2**20,
            "peak_file_backed_gib": peak_file / 2**20, "load_avg_1min_before": load,
            "load_avg_1min_after": os.getloadavg()[0]}


def same_tensors(a: Path, b: Path) -> dict:
    """Every tensor of the two checkpoints, compared by name, dtype and bytes."""
    import torch
    from safetensors import safe_open

    def names(path):
        out = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                out.update({k: file for k in f.keys()})
        return out

    left, right = names(a), names(b)
    differing = []
    for name in sorted(set(left) & set(right)):
        with safe_open(str(left[name]), "pt") as f, safe_open(str(right[name]), "pt") as g:
            x, y = f.get_tensor(name), g.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                differing.append(name)
    return {"tensors": len(left), "only_in_memory": sorted(set(left) - set(right)),
            "only_streamed": sorted(set(right) - set(left)), "differing": differing,
            "identical": not differing and set(left) == set(right)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="model alias (default %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="where the two checkpoints are written (default: a temp dir)")
    args = p.parse_args(argv)
    from jointrank.sources import resolve

    model_dir = resolve(args.model).path  # materialised once, before any timing
    work = Path(args.work or tempfile.mkdtemp(prefix="jointrank-compress-real-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"command": "python " + " ".join(["research/bench/compress_real.py", *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
               "source_gib": sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**30,
               "threads": args.threads}
    try:
        for name, stream in (("in_memory", False), ("stream", True)):
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            results[name] = run_path(model_dir, out, stream, args.threads)
            print(f"{name}: {results[name]['wall_seconds']:.1f} s, peak {results[name]['peak_rss_gib']:.2f} GiB",
                  flush=True)
        results["comparison"] = same_tensors(work / "in_memory", work / "stream")
        manifest = json.loads((work / "stream" / "jointrank_manifest.json").read_text())
        results["params"] = manifest.get("result", {}).get("params")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    mem, st = results["in_memory"], results["stream"]
    results["targets"] = [
        {"name": "streamed checkpoint byte-identical to the in-memory one", "measured": results["comparison"]["identical"],
         "target": True, "met": results["comparison"]["identical"]},
        {"name": "streaming peak RSS / in-memory peak RSS", "measured": st["peak_rss_gib"] / mem["peak_rss_gib"],
         "target": "< 1", "met": st["peak_rss_gib"] < mem["peak_rss_gib"]},
        {"name": "streaming peak anonymous memory / in-memory's", "measured": st["peak_anon_gib"] / mem["peak_anon_gib"],
         "target": "< 1", "met": st["peak_anon_gib"] < mem["peak_anon_gib"]},
    ]
    data = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    data[args.model] = results
    OUT_JSON.write_text(json.dumps(data, indent=1) + "\n")
    subprocess.run([sys.executable, str(REPO / "research" / "bench" / "compress_speed.py"), "--render"], check=True)
    print(f"wrote {OUT_JSON.relative_to(REPO)} and results/compress_speed.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
