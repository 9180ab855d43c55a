"""How fast, and in how much memory, a LLaMA-7B-shaped checkpoint is compressed: naive path vs the tool's default.

One run does everything:
  1. builds a float16 safetensors checkpoint with LLaMA-7B's dimensions (hidden 4096, intermediate 11008, 32 heads,
     vocab 32000) but only --layers of its 32 decoder layers, under /tmp (never in the repo). The weights are
     Gaussian with power-law column scales, so their spectra decay slowly like real weights' do;
  2. plans the paper-20 structure on the real 32-layer shapes (W_Q, W_K separate in every layer; joint W_gate/W_up
     in the last 22) and solves its ratio; the built layers all carry both kinds of unit, with that ratio;
  3. runs, each in its own subprocess so peak RSS is honest, the naive path (load the whole model, exact SVD of
     every unit, save) and the default path (`jointrank compress --stream`: memory-mapped, layer by layer, solver
     auto), and compares wall time, peak RSS and every unit's relative error;
  4. extrapolates both to 32 layers from the per-unit times: 32 x (W_Q + W_K) + 22 x (W_gate/W_up) + per-layer I/O;
  5. a solver study, in a third subprocess: layer 0's W_Q and [W_gate; W_up] factorised by every solver (median of
     --repeats runs each, as a ratio to exact SVD in the same process), plus the two pieces no eigendecomposition-
     based exact solver can avoid (the Gram product and a full float32 `eigh`), which bound the possible speed-up.

    flock -x /tmp/jointrank-cpu.lock python research/bench/compress_speed.py --layers 4   # writes results/compress_speed.*
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, num_hidden_layers=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
FULL_LAYERS, GATE_UP_LAYERS = 32, 22  # paper-20 on LLaMA-7B: gate/up joint in the last 22 of 32 layers
TARGETS = {"minutes_32_layers": 10.0, "speedup": 5.0, "peak_rss_gb": 3.0, "rel_error_diff": 1e-3}


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA_7B, "num_hidden_layers": layers}, torch_dtype="float16")


def build(path: Path, layers: int, seed: int = 0) -> None:
    """Write a LLaMA-7B-shaped float16 checkpoint, one shard per layer, without ever holding more than a layer."""
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").is_file() and json.loads((path / "config.json").read_text()).get(
            "num_hidden_layers") == layers:
        return
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    h, inter = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"]

    def weight(d_out, d_in):
        # Gaussian with power-law column scales in a random order: a slowly decaying spectrum like real weights'
        scales = torch.arange(1, d_in + 1, dtype=torch.float32) ** -0.5
        scales = scales[torch.randperm(d_in, generator=g)]
        w = torch.randn(d_out, d_in, generator=g) * scales
        return (w / w.norm() * (d_out * d_in) ** 0.5 * 0.02).to(torch.float16)

    weight_map, total = {}, 0
    shards = layers + 1
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {p + "self_attn.q_proj.weight": weight(h, h), p + "self_attn.k_proj.weight": weight(h, h),
                   p + "self_attn.v_proj.weight": weight(h, h), p + "self_attn.o_proj.weight": weight(h, h),
                   p + "mlp.gate_proj.weight": weight(inter, h), p + "mlp.up_proj.weight": weight(inter, h),
                   p + "mlp.down_proj.weight": weight(h, inter),
                   p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
    rest = {"model.embed_tokens.weight": (torch.randn(LLAMA_7B["vocab_size"], h, generator=g) * 0.02).half(),
            "lm_head.weight": (torch.randn(LLAMA_7B["vocab_size"], h, generator=g) * 0.02).half(),
            "model.norm.weight": torch.ones(h, dtype=torch.float16)}
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, str(path / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in rest})
    total += sum(t.numel() * 2 for t in rest.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    llama_config(layers).save_pretrained(path)


def paper20_ratio() -> float:
    """The approximation ratio paper-20 solves for on the real 32-layer LLaMA-7B shapes (no weights needed)."""
    from transformers import AutoModelForCausalLM

    from jointrank import PRESETS, make_plan
    from jointrank.architectures import describe

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(FULL_LAYERS))
    return make_plan(describe(model), PRESETS["paper-20"]).ratio


def bench_config(ratio: float):
    from jointrank import GroupRule, JointRankConfig

    return JointRankConfig(rules={"qk": GroupRule("separate"), "gate_up": GroupRule("joint")}, ratio=ratio)


# --- the two paths, each run in a fresh subprocess ----------------------------------------------------------------


def run_naive(src: Path, out: Path, ratio: float) -> dict:
    """Load the whole model, exact SVD of each unit (compress_'s loop with solver svd), save."""
    from transformers import AutoModelForCausalLM

    import jointrank
    from jointrank import compress_

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    loaded = time.perf_counter()
    config = bench_config(ratio)
    config.solver = "svd"
    units, seconds = [], []
    plan = jointrank.plan_for(model, config)
    # compress_ unit by unit, so each unit's time is known: one single-entry plan per unit
    from dataclasses import replace as dc_replace

    for entry in plan.factorised:
        t0 = time.perf_counter()
        result = compress_(model, dc_replace(plan, entries=(entry,)), progress=False)
        seconds.append(time.perf_counter() - t0)
        units.append(result.units[0])
    factorised = time.perf_counter()
    from jointrank.compress import attach_quantization_config

    attach_quantization_config(model, plan)  # the whole plan's units, not the last single-entry plan's
    whole = jointrank.CompressionResult(plan, units, plan.params_total_before, plan.params_total_after,
                                        plan.params_decoder_before, plan.params_decoder_after, sum(seconds))
    jointrank.save(model, None, out, whole, source=str(src), config=config)
    return {"wall_seconds": time.perf_counter() - start, "load_seconds": loaded - start,
            "factorise_seconds": factorised - loaded, "save_seconds": time.perf_counter() - factorised,
            "units": [_unit(u, s) for u, s in zip(units, seconds)]}


def run_default(src: Path, out: Path, ratio: float) -> dict:
    """`jointrank compress --stream` with every default (solver auto, one worker)."""
    from jointrank.stream import StreamOptions, compress_checkpoint

    start = time.perf_counter()
    done = compress_checkpoint(src, out, bench_config(ratio), options=StreamOptions(progress=False))
    r = done.result
    return {"wall_seconds": time.perf_counter() - start, "factorise_seconds": r.extra["stream"]["factorise_seconds"],
            "layer_seconds": r.extra["stream"]["layer_seconds"],
            "units": [_unit(u, s) for u, s in zip(r.units, r.extra["stream"]["unit_seconds"])]}


def _unit(u, seconds: float) -> dict:
    from jointrank.linalg import choose_solver

    h = LLAMA_7B["hidden_size"]
    rows = {"qk": h, "gate_up": 2 * LLAMA_7B["intermediate_size"]}[u.group]
    return {"layer": u.layer, "group": u.group, "members": [m.rsplit(".", 1)[1] for m in u.members], "rank": u.rank,
            "rel_error": u.rel_error, "seconds": seconds, "auto_solver": choose_solver((rows, h), u.rank),
            "solver_ran": u.solver}


def run_solvers(src: Path, ratio: float, repeats: int) -> dict:
    """Every solver on layer 0's W_Q and joint [W_gate; W_up], medians of `repeats` runs, and the floor pieces."""
    from jointrank.linalg import joint_rank_k, max_rank
    from jointrank.stream import TensorSource

    source = TensorSource.open(src)
    names = {"q_proj": ["model.layers.0.self_attn.q_proj.weight"],
             "gate_proj+up_proj": ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]}
    out = {}
    for unit, tensor_names in names.items():
        read = source.read(tensor_names)
        weights = [read[n] for n in tensor_names]
        d_outs, d_in = [w.shape[0] for w in weights], weights[0].shape[1]
        k = max(1, round(ratio * max_rank(d_outs, d_in)))
        rows = {}
        for solver in ("svd", "gram", "gram32", "rsvd"):
            times, f = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                f = joint_rank_k(weights, k, solver=solver)
                times.append(time.perf_counter() - t0)
            rows[solver] = {"seconds": statistics.median(times), "runs": times, "rel_error": f.rel_error,
                            "solver_ran": f.solver}
        stacked = torch.cat([w.float() for w in weights])
        floor = {}
        for piece, fn in (("gram_product", lambda: stacked.T @ stacked),
                          ("eigh_float32", lambda g=stacked.T @ stacked: torch.linalg.eigh(g))):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            floor[piece] = statistics.median(times)
        out[unit] = {"shape": [sum(d_outs), d_in], "rank": k, "solvers": rows, "floor": floor}
    return out


def child(args) -> None:
    torch.set_num_threads(args.threads)
    ratio = float(args.ratio)
    out = Path(args.dir).with_name(Path(args.dir).name + f"-out-{args.child}")
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    if args.child == "solvers":
        print("RESULT " + json.dumps(run_solvers(Path(args.dir), ratio, args.repeats)))
        return
    result = (run_naive if args.child == "naive" else run_default)(Path(args.dir), out, ratio)
    # the machine is shared: the 1-minute load average says how many other runnable processes competed
    result["load_average"] = [load_before, os.getloadavg()[0]]
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    shutil.rmtree(out, ignore_errors=True)
    print("RESULT " + json.dumps(result))


# --- the parent: build, run both, compare, extrapolate -------------------------------------------------------------


def extrapolate(res: dict) -> float:
    """Seconds for 32 layers: per-unit medians for the unit mix of paper-20, plus the measured per-layer rest."""
    by = {}
    for u in res["units"]:
        key = "gate_up" if u["group"] == "gate_up" else u["members"][0]
        by.setdefault(key, []).append(u["seconds"])
    med = {k: statistics.median(v) for k, v in by.items()}
    layers = len({u["layer"] for u in res["units"]})
    unit_total = sum(u["seconds"] for u in res["units"])
    overhead_per_layer = (res["wall_seconds"] - unit_total) / layers  # reading, writing, setup, per layer
    return (FULL_LAYERS * (med["q_proj"] + med["k_proj"]) + GATE_UP_LAYERS * med["gate_up"]
            + FULL_LAYERS * overhead_per_layer)


def render(data: dict) -> str:
    n, d = data["naive"], data["default"]
    rows = [("wall time, measured layers (s)", f"{n['wall_seconds']:.1f}", f"{d['wall_seconds']:.1f}"),
            ("factorisation time (s)", f"{n['factorise_seconds']:.1f}", f"{d['factorise_seconds']:.1f}"),
            ("peak RSS (GiB)", f"{n['peak_rss_gb']:.2f}", f"{d['peak_rss_gb']:.2f}"),
            ("extrapolated to 32 layers (min)", f"{data['extrapolated_minutes']['naive']:.1f}",
             f"{data['extrapolated_minutes']['default']:.1f}")]
    lines = [
        "# Compression speed on a LLaMA-7B-shaped checkpoint (2 CPU cores)",
        "",
        f"Generated by `{data['command']}` on {data['date']} (torch {data['torch']}, {data['threads']} threads).",
        "",
        f"Checkpoint: float16 safetensors, LLaMA-7B dimensions, {data['layers']} of 32 decoder layers, "
        f"{data['checkpoint_gb']:.2f} GB on disk. Plan: paper-20 structure, ratio {data['ratio']:.4f} solved on "
        "the 32-layer shapes (W_Q, W_K separate; W_gate/W_up joint), every built layer carrying both kinds of unit. "
        "One run of each path, each in its own subprocess; the extrapolation to 32 layers uses per-unit medians "
        "(32 x (W_Q + W_K) + 22 x gate/up) plus the measured per-layer I/O. Load average (1 min) before/after: "
        f"naive {n['load_average'][0]:.1f}/{n['load_average'][1]:.1f}, "
        f"default {d['load_average'][0]:.1f}/{d['load_average'][1]:.1f} (2 cores; other jobs share the machine).",
        "",
        "| | naive (load all, exact SVD) | default (`--stream`, solver auto) |",
        "|---|---:|---:|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"- speed ratio (naive / default), measured layers: **{data['speedup_measured']:.2f}x**; "
        f"extrapolated to 32 layers: **{data['speedup_extrapolated']:.2f}x**",
        f"- largest |relative error difference| over {len(d['units'])} units: **{data['max_rel_error_diff']:.2e}**",
        f"- solvers auto chose: {', '.join(sorted(set(u['auto_solver'] for u in d['units'])))}; "
        f"solvers that ran (after any float64 fallback): "
        f"{', '.join(sorted(set(u.get('solver_ran') or '?' for u in d['units'])))}",
        "",
        "| target | value | met |",
        "|---|---:|:---:|",
    ]
    for name, (value, target, ok) in data["targets"].items():
        lines.append(f"| {name} < {target} | {value:.3g} | {'yes' if ok else 'NO'} |"
                     if name != "speedup" else f"| {name} >= {target} | {value:.3g} | {'yes' if ok else 'NO'} |")
    lines += _render_solvers(data.get("solver_study"))
    lines += _render_real()
    lines += ["", "Per unit (seconds; relative error naive / default):", "",
              "| layer | unit | rank | naive s | default s | naive err | default err |", "|---:|---|---:|---:|---:|---:|---:|"]
    for a, b in zip(n["units"], d["units"]):
        lines.append(f"| {a['layer']} | {'+'.join(a['members'])} | {a['rank']} | {a['seconds']:.1f} | "
                     f"{b['seconds']:.1f} | {a['rel_error']:.6f} | {b['rel_error']:.6f} |")
    return "\n".join(lines) + "\n"


def _render_real() -> list[str]:
    """Real weights (research/bench/compress_real.py): --stream against the in-memory path, per model."""
    path = ROOT / "results" / "compress_speed_real.json"
    if not path.is_file():
        return []
    lines = ["", "## Real weights: `--stream` against the in-memory path", "",
             "Generated by `research/bench/compress_real.py` (`results/compress_speed_real.json`): the command a user "
             "types, each path in its own child process (wall time and the child's peak RSS), paper-20 structure at "
             "20% of the decoder parameters, data-free SVD, from the model's float32 safetensors. Peak RSS counts the "
             "pages of memory-mapped safetensors files the process has read (page cache the kernel can drop); "
             "*anonymous* is the largest RssAnon sampled every 50 ms, the memory that must fit in RAM.", "",
             "| model | command | source GiB | in memory: s | in memory: peak GiB (anonymous) | --stream: s | "
             "--stream: peak GiB (anonymous) | time ratio (memory / stream) | same bytes | load avg before/after |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|---|"]
    for model, r in json.loads(path.read_text()).items():
        m, st = r["in_memory"], r["stream"]
        anon = lambda x: f" ({x['peak_anon_gib']:.2f})" if "peak_anon_gib" in x else ""  # noqa: E731
        lines.append(f"| {model} | `{r['command']}` ({r['date']}) | {r['source_gib']:.2f} | {m['wall_seconds']:.0f} | "
                     f"{m['peak_rss_gib']:.2f}{anon(m)} | {st['wall_seconds']:.0f} | {st['peak_rss_gib']:.2f}{anon(st)} | "
                     f"{m['wall_seconds'] / st['wall_seconds']:.2f}x | "
                     f"{'yes' if r['comparison']['identical'] else '**no**'} | "
                     f"{m['load_avg_1min_before']:.1f}/{m['load_avg_1min_after']:.1f}, "
                     f"{st['load_avg_1min_before']:.1f}/{st['load_avg_1min_after']:.1f} |")
    return lines


def _render_solvers(study: dict | None) -> list[str]:
    if not study:
        return []
    lines = ["", "## Solver study (layer 0, same process; median seconds, ratio = exact SVD's time / solver's)", "",
             "| unit | shape | rank | solver | ran | seconds | speed vs svd | rel error | - exact |",
             "|---|---|---:|---|---|---:|---:|---:|---:|"]
    for unit, u in study.items():
        exact = u["solvers"]["svd"]
        for name, r in u["solvers"].items():
            lines.append(f"| {unit} | {u['shape'][0]}x{u['shape'][1]} | {u['rank']} | {name} | {r['solver_ran']} | "
                         f"{r['seconds']:.2f} | {exact['seconds'] / r['seconds']:.2f}x | {r['rel_error']:.6f} | "
                         f"{r['rel_error'] - exact['rel_error']:+.1e} |")
    lines += ["", "The floor of any exact solver built on an eigendecomposition (Gram product + full float32 `eigh`):",
              ""]
    for unit, u in study.items():
        f, svd = u["floor"], u["solvers"]["svd"]["seconds"]
        total = f["gram_product"] + f["eigh_float32"]
        lines.append(f"- {unit}: Gram product {f['gram_product']:.2f} s + eigh {f['eigh_float32']:.2f} s = "
                     f"{total:.2f} s, so at most **{svd / total:.2f}x** faster than exact SVD ({svd:.2f} s)")
    return lines


def _command() -> str:
    """The exact command line, with the flock wrapper around it when there is one (it says how CPU was shared)."""
    own = "python " + " ".join(["research/bench/compress_speed.py", *sys.argv[1:]])
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
        if parent and parent[0].endswith(b"flock"):
            return " ".join(a.decode() for a in parent[:3]) + " " + own
    except OSError:
        pass
    return own


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dir", default="/tmp/jointrank-llama7b-shaped")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "compress_speed.json"))
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the JSON")
    p.add_argument("--repeats", type=int, default=3, help="runs per solver in the solver study (median reported)")
    p.add_argument("--child", choices=["naive", "default", "solvers"], help=argparse.SUPPRESS)
    p.add_argument("--ratio", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="tiny dimensions, to check the script itself quickly")
    args = p.parse_args()
    if args.smoke:
        LLAMA_7B.update(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                        vocab_size=1000)
        args.dir += "-smoke"
        args.out = "/tmp/jointrank-compress-speed-smoke.json"
    out = Path(args.out)
    if args.child:
        if args.smoke:
            args.dir = args.dir[: -len("-smoke")]
        return child(args)
    if args.render:
        out.with_suffix(".md").write_text(render(json.loads(out.read_text())))
        return
    if not args.dir.startswith("/tmp/"):
        sys.exit("--dir must be under /tmp (the checkpoint is several GB; never in the repo)")
    t0 = time.perf_counter()
    build(Path(args.dir), args.layers)
    print(f"checkpoint ready in {time.perf_counter() - t0:.0f} s", flush=True)
    ratio = paper20_ratio()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for path in ("naive", "default", "solvers"):
        cmd = [sys.executable, __file__, "--child", path, "--ratio", repr(ratio), "--dir", args.dir,
               "--threads", str(args.threads), "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{path} failed:\n{done.stderr[-3000:]}")
        results[path] = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
        if path != "solvers":
            print(f"{path}: {results[path]['wall_seconds']:.1f} s, peak RSS {results[path]['peak_rss_gb']:.2f} GiB",
                  flush=True)
    n, d = results["naive"], results["default"]
    diffs = [abs(a["rel_error"] - b["rel_error"]) for a, b in zip(n["units"], d["units"])]
    assert [(a["layer"], a["members"]) for a in n["units"]] == [(b["layer"], b["members"]) for b in d["units"]]
    minutes = {k: extrapolate(results[k]) / 60 for k in ("naive", "default")}
    data = {
        "command": _command(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "threads": args.threads, "layers": args.layers, "ratio": ratio,
        "checkpoint_gb": sum(f.stat().st_size for f in Path(args.dir).glob("*.safetensors")) / 1e9,
        "naive": n, "default": d, "speedup_measured": n["wall_seconds"] / d["wall_seconds"],
        "extrapolated_minutes": minutes, "speedup_extrapolated": minutes["naive"] / minutes["default"],
        "max_rel_error_diff": max(diffs), "solver_study": results["solvers"],
    }
    data["targets"] = {
        "minutes_32_layers": (minutes["default"], TARGETS["minutes_32_layers"],
                              minutes["default"] < TARGETS["minutes_32_layers"]),
        "speedup": (data["speedup_extrapolated"], TARGETS["speedup"], data["speedup_extrapolated"] >= TARGETS["speedup"]),
        "peak_rss_gb": (d["peak_rss_gb"], TARGETS["peak_rss_gb"], d["peak_rss_gb"] < TARGETS["peak_rss_gb"]),
        "rel_error_diff": (max(diffs), TARGETS["rel_error_diff"], max(diffs) < TARGETS["rel_error_diff"]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
