"""Inference speed and memory of dense vs compressed models, in one run: prefill, decode, memory, bytes.

    python research/bench/inference_speed.py --out results/inference_speed        # Gemma-3-270M (the default)
    python research/bench/inference_speed.py --model qwen2.5-coder-1.5b --structures joint --prefill-batches 1 \
        --decode-tokens 32 --lock '' --out results/inference_speed_qwen2.5-coder-1.5b

The script takes the shared CPU lock itself (--lock): shared while it builds models and runs the memory children
(not timing-sensitive), exclusive while it times, so other engineers' jobs never overlap a timing run.

What is measured (all timings under torch.inference_mode, OMP threads as --threads, medians of --repeats runs;
every model is timed in the same process, in an order rotated between repeats, so ratios compare like with like):

- prefill tokens/s: one forward over batch x 512 random tokens with the KV cache being filled and the logits of the
  last position only (what generate() does for a prompt), batch 1 and 8;
- decode tokens/s: generate() greedy with KV cache, batch 1, from a 32-token prompt: 127 / (t(128 new) - t(1 new)),
  i.e. the cost of the decode steps alone;
- decode, paired step by step (the decode target's reading): each @20% model's decode steps alternated one token
  at a time with dense's, --interleaved-rounds rounds; dense's seconds / the model's, median over rounds (the
  joint@20% row-major variant is paired with dense the same way: which layout decodes faster);
- decode time shares: one more 128-token generate() per model with timing hooks on the decoder layers and the
  lm_head, so what bounds a decode speedup is measured, not guessed;
- weight bytes: unique parameter and buffer bytes; peak resident memory: a child process per model and dtype
  loads the model as built here, resets the kernel's high-water mark (/proc/self/clear_refs) and runs prefill
  --memory-batch x 512 plus a 32-token generate(); its VmHWM is the peak of inference (loading excluded), VmRSS
  before it the resident size of the loaded model (Python, torch and transformers included).

Compressed models: two structures at 10/20/40% decoder-parameter reduction (JointRankConfig target, scope decoder):
  paper20  - the paper's 20% structure: separate rank-k Q and K in every layer, joint gate/up in the last 22/32;
  joint    - joint Q/K and joint gate/up in every layer (every projection shared; V, O, down dense).
The factors are computed once in float32; the bfloat16 models are the same models cast.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import fcntl
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import torch

STRUCTURES = {
    "paper20": {"qk": ("separate", "all"), "gate_up": ("joint", "last:22/32")},
    "joint": {"qk": ("joint", "all"), "gate_up": ("joint", "all")},
}
PROMPT_LEN = 32


def config_for(structure: str, target: float):
    from jointrank import GroupRule, JointRankConfig

    rules = {g: GroupRule(m, layers) for g, (m, layers) in STRUCTURES[structure].items()}
    return JointRankConfig(rules=rules, target=target, scope="decoder")


def variants(args) -> list[dict]:
    """Every model timed: dense, each structure at each reduction, and the joint structure at 20% with the
    shared projection switched off (what sharing saves)."""
    out = [{"name": "dense", "structure": None, "target": None, "share": True}]
    for structure in args.structures:
        for target in args.reductions:
            out.append({"name": f"{structure}@{target:.0%}", "structure": structure, "target": target, "share": True})
    if "joint" in args.structures and 0.2 in args.reductions:
        out.append({"name": "joint@20% unshared", "structure": "joint", "target": 0.2, "share": False,
                    "same_model_as": "joint@20%"})
        # float32 and bfloat16 on a CPU hold the output factors column-major (LowRankLinear.relayout_): what that layout
        # buys, and the same layout given to dense's decoder linears, so the speedup owed to it is not credited
        # to compression. Its prefill is timed too (whether the layout that speeds decode slows prefill), and
        # its decode paired step by step with dense like the tool's layout (which of the two decodes faster)
        out.append({"name": "joint@20% row-major", "structure": "joint", "target": 0.2, "share": True,
                    "same_model_as": "joint@20%", "layout": "row", "dtypes": ["float32", "bfloat16"],
                    "prefill": True, "paired": True})
        out.append({"name": "dense column-major", "structure": None, "target": None, "share": True,
                    "same_model_as": "dense", "layout": "column", "dtypes": ["float32"]})
    return out


VARIANT_SUFFIXES = (" unshared", " row-major", " column-major")  # the same model timed another way


def base_model(name: str) -> str:
    for suffix in VARIANT_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


@contextlib.contextmanager
def layout(model, kind: str | None):
    """Time `model` with its weights in another memory order, then put them back: "row" = the low-rank output
    factors row-major (as before LowRankLinear.relayout_), "column" = every decoder nn.Linear column-major."""
    import torch.nn as nn

    from jointrank.architectures import decoder_layers
    from jointrank.modules import LowRankLinear, relayout_

    if kind is None:
        yield
        return
    linears = [m for m in decoder_layers(model)[1].modules() if isinstance(m, nn.Linear)]
    try:
        if kind == "row":
            LowRankLinear.column_major = False
            relayout_(model)
        else:
            for m in linears:
                m.weight.data = m.weight.data.t().contiguous().t()
        yield
    finally:
        LowRankLinear.column_major = True
        if kind == "column":
            for m in linears:
                m.weight.data = m.weight.data.contiguous()
        relayout_(model)


# ----------------------------------------------------------------------------------------------- measurement


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _sync_time() -> float:
    return time.perf_counter()


def time_prefill(model, ids) -> float:
    start = _sync_time()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return _sync_time() - start


def time_generate(model, prompt, new_tokens: int) -> float:
    start = _sync_time()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    elapsed = _sync_time() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def decode_interleaved(pair: dict, prompt, new_tokens: int, rounds: int) -> dict:
    """Decode steps of two models alternated one token at a time, so a change of the machine's speed that lasts
    seconds (bfloat16 decode on this CPU: the same dense model takes 5.3 s or 6.9 s from one repeat to the next)
    reaches both models alike. Each round: both prefill the prompt, then `new_tokens - 1` steps each (forward of
    the last token with the KV cache, the last position's logits, greedy argmax), the order swapped every step.
    {name: seconds of each round's steps}; `ratio`: median over rounds of first's seconds / second's (> 1: the
    second is faster), `step_ratio`: median over steps of the same ratio; `tokens`: each model's greedy
    continuation (the last round's), what generate() would have produced."""
    from jointrank.architectures import cache_keyword

    names = list(pair)
    kw = {n: cache_keyword(m) for n, m in pair.items()}
    seconds = {n: [] for n in names}
    steps = {n: [] for n in names}
    for r in range(rounds):
        state, tokens = {}, {n: [] for n in names}
        for n in names:
            out = pair[n](input_ids=prompt, use_cache=True, logits_to_keep=1)
            state[n] = (getattr(out, kw[n]), out.logits[:, -1].argmax(-1, keepdim=True))
        spent = {n: 0.0 for n in names}
        for step in range(new_tokens - 1):
            for n in (names if (r + step) % 2 == 0 else names[::-1]):
                cache, token = state[n]
                start = _sync_time()
                out = pair[n](input_ids=token, use_cache=True, logits_to_keep=1, **{kw[n]: cache})
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                took = _sync_time() - start
                spent[n] += took
                steps[n].append(took)
                tokens[n].append(int(state[n][1]))
                state[n] = (getattr(out, kw[n]), token)
        for n in names:
            seconds[n].append(spent[n])
    first, second = names
    per_round = [a / b for a, b in zip(seconds[first], seconds[second])]
    return {"seconds": seconds, "steps_per_round": new_tokens - 1, "round_ratios": per_round,
            "ratio": statistics.median(per_round),
            "step_ratio": statistics.median(a / b for a, b in zip(steps[first], steps[second])),
            "tokens": {n: t + [int(state[n][1])] for n, t in tokens.items()}}


def linear_kinds(layers) -> dict[str, list]:
    """The decoder layers' matmul modules by kind, each with the weight bytes one token reads through it:
    "dense linear" (nn.Linear left whole), "low-rank" (LowRankLinear: its output factor, its own basis, and a
    shared basis counted once, at the first member that projects through it)."""
    import torch.nn as nn

    from jointrank.modules import LowRankLinear

    lowrank = [m for m in layers.modules() if isinstance(m, LowRankLinear)]
    inside = {id(c) for m in lowrank for c in m.modules()}
    kinds = {"dense linear": [(m, weight_bytes(m)) for m in layers.modules()
                              if isinstance(m, nn.Linear) and id(m) not in inside], "low-rank": []}
    counted = set()
    for m in lowrank:
        nbytes = weight_bytes(m)  # out factor (+ bias) (+ own basis); a shared basis is not a submodule
        if m.shared_basis is not None and id(m.shared_basis) not in counted:
            counted.add(id(m.shared_basis))
            nbytes += weight_bytes(m.shared_basis)
        kinds["low-rank"].append((m, nbytes))
    return {k: v for k, v in kinds.items() if v}


def decode_shares(model, prompt, new_tokens: int) -> dict:
    """Seconds spent in the decoder layers and in the lm_head during one generate(), measured with hooks; inside
    the layers, seconds and weight bytes per token of each kind of matmul module (linear_kinds), so a factorised
    layer that runs below its share of the bytes shows as a lower GB/s than the dense layers'."""
    from jointrank.architectures import decoder_layers

    _, layers = decoder_layers(model)
    kinds = linear_kinds(layers)
    spent = {"layers": 0.0, "lm_head": 0.0, **{k: 0.0 for k in kinds}}
    marks = {}

    def pre(mark):
        return lambda *a, **k: marks.__setitem__(mark, time.perf_counter())

    def post(key, mark):
        return lambda *a, **k: spent.__setitem__(key, spent[key] + time.perf_counter() - marks[mark])

    handles = [layers[0].register_forward_pre_hook(pre("layers")),
               layers[-1].register_forward_hook(post("layers", "layers")),
               model.lm_head.register_forward_pre_hook(pre("lm_head")),
               model.lm_head.register_forward_hook(post("lm_head", "lm_head"))]
    for kind, modules in kinds.items():
        for m, _ in modules:
            handles += [m.register_forward_pre_hook(pre(id(m))), m.register_forward_hook(post(kind, id(m)))]
    try:
        total = time_generate(model, prompt, new_tokens)
    finally:
        for h in handles:
            h.remove()
    return {"total_s": total, "layers_s": spent["layers"], "lm_head_s": spent["lm_head"],
            "layers_share": spent["layers"] / total, "lm_head_share": spent["lm_head"] / total,
            "other_share": 1 - (spent["layers"] + spent["lm_head"]) / total,
            "kinds": {k: {"seconds": spent[k], "weight_bytes": sum(b for _, b in v), "modules": len(v)}
                      for k, v in kinds.items()}}


# ----------------------------------------------------------------------------------------------- building models


def build_models(args, log) -> tuple[dict, dict]:
    """All models in float32, sharing the (untouched) embedding/lm_head tensor so they fit in memory together."""
    from jointrank import compress_
    from jointrank.sources import load_model

    dense, _, _ = load_model(args.model)
    embedding = dense.get_input_embeddings().weight
    models, info = {"dense": dense}, {}
    for v in variants(args):
        if v["structure"] is None or "same_model_as" in v:
            continue
        model = copy.deepcopy(dense, memo={id(embedding): embedding})
        started = time.perf_counter()
        result = compress_(model, config_for(v["structure"], v["target"]), progress=False)
        info[v["name"]] = {
            "params_total": result.params_total_after, "params_decoder": result.params_decoder_after,
            "params_decoder_reduction": 1 - result.params_decoder_after / result.params_decoder_before,
            "params_total_reduction": 1 - result.params_total_after / result.params_total_before,
            "ratio": result.plan.ratio, "units": len(result.units), "compress_s": time.perf_counter() - started,
            "ranks": sorted({(u.group, u.structure, u.rank) for u in result.units}),
        }
        models[v["name"]] = model.eval()
        log(f"built {v['name']}: decoder -{info[v['name']]['params_decoder_reduction']:.2%}, "
            f"ratio {result.plan.ratio:.4f}, {info[v['name']]['compress_s']:.1f} s")
    from jointrank.architectures import count_parameters, decoder_layers

    info["dense"] = {"params_total": count_parameters(dense), "params_decoder": count_parameters(decoder_layers(dense)[1]),
                     "params_decoder_reduction": 0.0, "params_total_reduction": 0.0}
    return models, info


def time_all(models: dict, args, dtype_name: str, log) -> dict:
    from jointrank.modules import shared_projection

    gen = torch.Generator().manual_seed(0)
    vocab = models["dense"].config.vocab_size
    inputs = {b: torch.randint(0, vocab, (b, args.prefill_len), generator=gen) for b in args.prefill_batches}
    prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=gen)
    vs = [v for v in variants(args) if dtype_name in v.get("dtypes", [dtype_name])]

    def model_of(v: dict):  # a variant that times another model another way runs that model
        return models[v.get("same_model_as", v["name"])]

    samples = {v["name"]: {"prefill": {b: [] for b in args.prefill_batches}, "gen_long": [], "gen_one": []}
               for v in vs}
    with torch.inference_mode():
        for v in vs:  # warm-up: first calls allocate and pick kernels
            model = model_of(v)
            with shared_projection(v["share"]), layout(model, v.get("layout")):
                time_prefill(model, inputs[min(args.prefill_batches)][:, :64])
                time_generate(model, prompt, 4)
        for rep in range(args.repeats):
            order = vs[rep % len(vs):] + vs[:rep % len(vs)]  # rotate, so no model always runs first
            for v in order:
                model = model_of(v)
                s = samples[v["name"]]
                with shared_projection(v["share"]), layout(model, v.get("layout")):
                    # the same model timed another way: decode only, to save time (unless it asks for prefill)
                    for b in args.prefill_batches if "same_model_as" not in v or v.get("prefill") else ():
                        s["prefill"][b].append(time_prefill(model, inputs[b]))
                    s["gen_one"].append(time_generate(model, prompt, 1))
                    s["gen_long"].append(time_generate(model, prompt, args.decode_tokens))
            log(f"{dtype_name}: repeat {rep + 1}/{args.repeats} done")
        interleaved = {}
        for v in vs:  # the decode target's reading: each @20% model against dense, one token at a time (and a
            # variant that asks for it: the row-major one, so the layout is chosen from two paired readings)
            if v["target"] == 0.2 and ("same_model_as" not in v or v.get("paired")) and args.interleaved_rounds:
                model = model_of(v)
                with shared_projection(v["share"]), layout(model, v.get("layout")):
                    interleaved[v["name"]] = decode_interleaved({"dense": models["dense"], v["name"]: model}, prompt,
                                                                args.decode_tokens, args.interleaved_rounds)
                log(f"{dtype_name}: {v['name']} interleaved with dense: {interleaved[v['name']]['ratio']:.3f}x")
        shares = {}
        for v in vs:
            if v["name"] == "dense" or v["target"] == 0.2:
                model = model_of(v)
                with shared_projection(v["share"]), layout(model, v.get("layout")):
                    shares[v["name"]] = decode_shares(model, prompt, args.decode_tokens)
    out = {}
    for v in vs:
        s = samples[v["name"]]
        decode_s = [long - one for long, one in zip(s["gen_long"], s["gen_one"])]
        out[v["name"]] = {
            "prefill_tokens_per_s": {str(b): b * args.prefill_len / statistics.median(t) for b, t in s["prefill"].items()
                                     if t},
            "prefill_seconds": {str(b): t for b, t in s["prefill"].items()},
            "decode_tokens_per_s": (args.decode_tokens - 1) / statistics.median(decode_s),
            "decode_seconds": decode_s,
            "decode_shares": shares.get(v["name"]),
            "decode_interleaved": interleaved.get(v["name"]),
            "weight_bytes": weight_bytes(model_of(v)),
        }
    return out


# ----------------------------------------------------------------------------------------------- peak memory


def _status(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def memory_child(spec: dict) -> dict:
    """Run in a fresh process: load one saved model, then measure the resident peak of inference alone."""
    torch.set_num_threads(spec["threads"])
    import jointrank  # noqa: F401  (the low-rank module classes the pickle refers to)

    model = torch.load(spec["path"], weights_only=False).to(getattr(torch, spec["dtype"])).eval()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the float32 copies back, so RSS is the model's
    resident = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        model(input_ids=torch.randint(0, vocab, (spec["batch"], spec["prefill_len"]), generator=gen),
              use_cache=True, logits_to_keep=1)
        time_generate(model, torch.randint(0, vocab, (1, PROMPT_LEN), generator=gen), 32)
    return {"resident_bytes": resident, "peak_bytes": _status("VmHWM"), "weight_bytes": weight_bytes(model)}


def measure_memory(args, models: dict, log) -> dict:
    """One child per model and dtype, each loading the model as built here (so no SVD or dense remnants count).
    glibc is told to map every large block separately (MALLOC_MMAP_THRESHOLD_), so freed memory leaves RSS."""
    out = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
    with tempfile.TemporaryDirectory(prefix="jointrank-bench-") as tmp:
        paths = {}
        for name, model in models.items():
            paths[name] = Path(tmp) / f"{len(paths)}.pt"
            torch.save(model, paths[name])
        for dtype in args.dtypes:
            for name, path in paths.items():
                spec = {"path": str(path), "dtype": dtype, "threads": args.threads,
                        "prefill_len": args.prefill_len, "batch": args.memory_batch}
                proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory child {name} {dtype} failed:\n{proc.stderr[-3000:]}")
                out.setdefault(dtype, {})[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                log(f"memory {dtype} {name}: peak {out[dtype][name]['peak_bytes'] / 2**20:.0f} MiB")
    return out


# ----------------------------------------------------------------------------------------------- report


def ratios(results: dict) -> dict:
    """Per dtype and model: every measure divided by dense's (higher is better for speeds, lower for sizes)."""
    out = {}
    for dtype, timing in results["timing"].items():
        dense = timing["dense"]
        mem = results["memory"].get(dtype, {})
        for name, t in timing.items():
            base = base_model(name)
            r = {f"prefill_b{b}": t["prefill_tokens_per_s"][b] / dense["prefill_tokens_per_s"][b]
                 for b in t["prefill_tokens_per_s"]}
            r["decode"] = t["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
            # each repeat times every model once: the median of the per-repeat ratios pairs them, so a state of the
            # machine that shifts a whole repeat (bfloat16 decode on this CPU: 5.3 s or 6.5-6.9 s for the same
            # dense model) does not decide the ratio the way it can decide a ratio of two medians
            r["decode_paired"] = statistics.median(d / m for d, m in zip(dense["decode_seconds"], t["decode_seconds"],
                                                                         strict=True))
            if t.get("decode_interleaved"):
                r["decode_interleaved"] = t["decode_interleaved"]["ratio"]
            r["weight_bytes"] = t["weight_bytes"] / dense["weight_bytes"]
            if base in mem:
                r["peak_memory"] = mem[base]["peak_bytes"] / mem["dense"]["peak_bytes"]
                r["resident_memory"] = mem[base]["resident_bytes"] / mem["dense"]["resident_bytes"]
            out.setdefault(dtype, {})[name] = r
    return out


def targets(results: dict) -> list[dict]:
    checks = []
    params = results["params"]
    for dtype, rs in results["ratios"].items():
        for name, r in rs.items():
            if name == "dense" or base_model(name) != name:
                continue
            if name.endswith("@20%") and "dense column-major" in rs:  # the layout's share taken out (see variants)
                fair = r["decode"] / rs["dense column-major"]["decode"]
                checks.append({"name": f"{dtype} {name}: decode tokens/s vs dense with its decoder weights "
                                       "column-major too", "measured": fair, "dtype": dtype, "model": name,
                               "target": "decode >= 1.15x dense, same layout", "value": fair, "met": fair >= 1.15})
            if name.endswith("@20%") and "decode_interleaved" in r:  # the paired reading (decode_interleaved)
                value = r["decode_interleaved"]
                checks.append({"name": f"{dtype} {name}: decode tokens/s vs dense (steps alternated with dense's, "
                                       "median over rounds)", "measured": value,
                               "dtype": dtype, "model": name, "target": "decode >= 1.15x dense",
                               "value": value, "ratio_of_medians": r["decode"],
                               "median_of_paired": r.get("decode_paired"), "met": value >= 1.15})
            elif name.endswith("@20%"):  # runs before it: met only when both readings of the repeats are
                low = min(r["decode"], r.get("decode_paired", r["decode"]))
                checks.append({"name": f"{dtype} {name}: decode tokens/s vs dense (the lower of the ratio of medians "
                                       "and the median of per-repeat ratios)", "measured": low,
                               "dtype": dtype, "model": name, "target": "decode >= 1.15x dense",
                               "value": low, "ratio_of_medians": r["decode"],
                               "median_of_paired": r.get("decode_paired"), "met": low >= 1.15})
            worst = min(v for k, v in r.items() if k.startswith("prefill"))
            checks.append({"name": f"{dtype} {name}: prefill tokens/s vs dense (worst batch)", "measured": worst,
                           "dtype": dtype, "model": name, "target": "prefill >= 1.00x dense (every batch)",
                           "value": worst, "met": worst >= 1.0})
            if "weight_bytes" in r:
                expected = params[name]["params_total"] / params["dense"]["params_total"]
                checks.append({"name": f"{dtype} {name}: weight bytes vs dense", "measured": r["weight_bytes"],
                               "dtype": dtype, "model": name,
                               "target": "weight bytes ratio = parameter ratio (within 1%)",
                               "value": r["weight_bytes"], "expected": expected,
                               "met": abs(r["weight_bytes"] - expected) <= 0.01 * expected})
    return checks


def bound(results: dict) -> dict:
    """The decode speedup a purely memory-bound model predicts from weight bytes read per token (the lm_head
    reads all of its weights per token, 262144 x 640 on Gemma-3-270M; the embedding lookup reads one row)."""
    out = {}
    p = results["params"]
    head = results["lm_head_params"]
    for name, info in p.items():
        if name == "dense":
            continue
        out[name] = (p["dense"]["params_decoder"] + head) / (info["params_decoder"] + head)
    return out


def memory_section(results: dict) -> list[str]:
    """Sizes alone (what the memory children measured), for a run whose timing has not happened."""
    from jointrank.tables import format_table

    lines = []
    for dtype, mem in results["memory"].items():
        dense, pd = mem["dense"], results["params"]["dense"]
        rows = []
        for name, m in mem.items():
            p = results["params"][name]
            expected, got = p["params_total"] / pd["params_total"], m["weight_bytes"] / dense["weight_bytes"]
            rows.append([name, f"{p['params_decoder_reduction']:.1%}", f"{p['params_total_reduction']:.1%}",
                         f"{m['weight_bytes'] / 2**20:.1f} ({got:.4f}x)", f"{expected:.4f}x",
                         "yes" if abs(got - expected) <= 0.01 * expected else "**no**",
                         f"{m['resident_bytes'] / 2**20:.0f} ({m['resident_bytes'] / dense['resident_bytes']:.3f}x)",
                         f"{m['peak_bytes'] / 2**20:.0f} ({m['peak_bytes'] / dense['peak_bytes']:.3f}x)"])
        lines += [f"## {dtype}: memory", "",
                  format_table(["model", "decoder params removed", "model params removed", "weight MiB",
                                "parameter ratio", "bytes within 1% of it", "resident MiB after load",
                                "peak RSS MiB"], rows, markdown=True), ""]
    return lines


def layout_text(results: dict) -> str:
    """How the run held the low-rank output factors (column-major in float32 only before bfloat16 joined it)."""
    held = results.get("column_major_dtypes", ["float32"])
    text = (f"In {' and '.join(held)} the low-rank output factors are held column-major (the tool's layout on a CPU), "
            "row-major otherwise; *row-major* = the same model with them row-major; ")
    if "joint@20% column-major" in results.get("timing", {}).get("bfloat16", {}):
        text += "*column-major* = the bfloat16 model with them column-major (the tool's layout since this run); "
    return text


def markdown(results: dict) -> str:
    from jointrank.tables import format_table

    a = results["args"]
    lines = [
        f"# Inference speed and memory: dense vs compressed {results.get('model', 'gemma-3-270m')}",
        "",
        f"Generated by `research/bench/inference_speed.py` from `{Path(a['out']).name}.json`; do not edit by hand.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
        f"{results['machine']['torch']}, transformers {results['machine']['transformers']}, "
        f"{a['threads']} threads; {a['repeats']} repeats (medians), run {results['started']} "
        f"({results['seconds'] / 60:.1f} min).",
        "",
        "Structures (target = fraction of decoder-layer parameters removed, one ratio solved per model): "
        "**paper20** = separate rank-k Q and K in every layer + joint gate/up in the last 22/32 of the layers "
        "(the paper's 20% structure); **joint** = joint Q/K + joint gate/up in every layer. "
        "*unshared* = the same joint model with the shared projection switched off (each member projects). "
        + layout_text(results)
        + "*dense column-major* = dense with every decoder linear column-major, "
        "the baseline that credits the layout to neither side.",
        "",
        "Prefill: batch x 512 tokens, KV cache filled, last-position logits. Decode: batch 1, greedy generate() "
        f"with KV cache, {a['decode_tokens']} new tokens after a {PROMPT_LEN}-token prompt, "
        f"({a['decode_tokens']}-1) / (t({a['decode_tokens']}) - t(1)). Peak RSS: a fresh process per model "
        f"and dtype, high-water mark of prefill {a.get('memory_batch', 1)} x {a['prefill_len']} + a 32-token "
        "generate() after loading (Python, torch and transformers included, ~400 MiB in every row).",
        "",
    ]
    if results.get("status"):
        lines += [f"**Status: {results['status']}**", ""]
    if not results["timing"]:
        return "\n".join(lines + memory_section(results))
    for dtype in a["dtypes"]:
        timing, r, mem = results["timing"][dtype], results["ratios"][dtype], results["memory"].get(dtype, {})
        rows = []
        for name, t in timing.items():
            base = base_model(name)
            p = results["params"][base]
            m = mem.get(base, {})
            rows.append([name, f"{p['params_decoder_reduction']:.1%}", f"{p['params_total_reduction']:.1%}"]
                        + [f"{t['prefill_tokens_per_s'][b]:.0f} ({r[name][f'prefill_b{b}']:.2f}x)"
                           if b in t["prefill_tokens_per_s"] else "-" for b in timing["dense"]["prefill_tokens_per_s"]]
                        + [f"{t['decode_tokens_per_s']:.1f} ({r[name]['decode']:.2f}x)",
                           f"{t['weight_bytes'] / 2**20:.0f} ({r[name]['weight_bytes']:.3f}x)",
                           f"{m['peak_bytes'] / 2**20:.0f} ({r[name]['peak_memory']:.3f}x)" if m else ""])
        headers = (["model", "decoder params removed", "model params removed"]
                   + [f"prefill b{b} tok/s" for b in timing["dense"]["prefill_tokens_per_s"]]
                   + ["decode tok/s", "weight MiB", "peak RSS MiB"])
        lines += [f"## {dtype}", "", format_table(headers, rows, markdown=True), ""]
    lines += [f"## Where decode time goes (one {a['decode_tokens']}-token generate() with timing hooks)", ""]
    rows = []
    for dtype in a["dtypes"]:
        for name, t in results["timing"][dtype].items():
            s = t["decode_shares"]
            if s:
                rows.append([dtype, name, f"{s['lm_head_share']:.1%}", f"{s['layers_share']:.1%}",
                             f"{s['other_share']:.1%}", f"{s['lm_head_s'] * 1000 / a['decode_tokens']:.1f}",
                             f"{s['layers_s'] * 1000 / a['decode_tokens']:.1f}"])
    lines += [format_table(["dtype", "model", "lm_head", "decoder layers", "other (embedding, norm, generate)",
                            "lm_head ms/token", "layers ms/token"], rows, markdown=True), ""]
    rows = []
    for dtype in a["dtypes"]:
        for name, t in results["timing"][dtype].items():
            for kind, k in ((t["decode_shares"] or {}).get("kinds") or {}).items():
                per_token = k["seconds"] / a["decode_tokens"]
                rows.append([dtype, name, kind, str(k["modules"]), f"{k['weight_bytes'] / 2**20:.0f}",
                             f"{per_token * 1000:.1f}", f"{k['weight_bytes'] / per_token / 1e9:.1f}"])
    if rows:
        lines += ["Inside the decoder layers, by kind of matmul module (hooks on each; the prompt's forward pass is "
                  "one of the steps): a factorised layer that runs below its share of the bytes reads its weights "
                  "at fewer GB/s than the dense layers do.", "",
                  format_table(["dtype", "model", "modules", "count", "weight MiB", "ms/token", "GB/s"], rows,
                               markdown=True), ""]
    lines += ["What a decode speedup can be at most, two ways: *bytes* = (decoder + lm_head weights) before / after, "
              "the speedup if decode time were proportional to the weights read per token; *measured shares* = "
              "1 / (1 - s + s·p), the speedup if the decoder layers' measured share s of dense decode time shrank "
              "in proportion p to their parameters and nothing else changed (lm_head, embedding, generate() "
              "overhead stay).", ""]
    rows = []
    for name, v in results["bound"].items():
        if "unshared" in name:
            continue
        p = results["params"][name]["params_decoder"] / results["params"]["dense"]["params_decoder"]
        cells = [name, f"{v:.3f}x"]
        for dtype in a["dtypes"]:
            s = results["timing"][dtype]["dense"]["decode_shares"]["layers_share"]
            cells += [f"{1 / (1 - s + s * p):.3f}x", f"{results['ratios'][dtype][name]['decode']:.3f}x"]
        rows.append(cells)
    headers = ["model", "bytes bound"]
    for dtype in a["dtypes"]:
        headers += [f"{dtype}: shares bound", f"{dtype}: measured"]
    lines += [format_table(headers, rows, markdown=True), ""]
    rows = []
    for dtype in a["dtypes"]:
        for name, t in results["timing"][dtype].items():
            d = t.get("decode_interleaved")
            if d:
                rows.append([dtype, name, str(len(d["round_ratios"])),
                             f"{statistics.median(d['seconds']['dense']) * 1000 / d['steps_per_round']:.1f}",
                             f"{statistics.median(d['seconds'][name]) * 1000 / d['steps_per_round']:.1f}",
                             f"{d['ratio']:.3f}x", f"{min(d['round_ratios']):.3f}-{max(d['round_ratios']):.3f}",
                             f"{d['step_ratio']:.3f}x"])
    if rows:
        lines += ["## Decode, paired step by step", "",
                  "Decode steps of dense and the compressed model alternated one token at a time (the "
                  f"{PROMPT_LEN}-token prompt prefilled by each, then {a['decode_tokens'] - 1} steps per round, each "
                  "one forward of the last token with the KV cache, the last position's logits and a greedy argmax, "
                  "the order swapped every step): a slow spell of the "
                  "machine reaches both alike, which the repeats above cannot promise (each times a whole generate() "
                  "per model, seconds apart). generate()'s own overhead is not in these steps.", "",
                  format_table(["dtype", "model", "rounds", "dense ms/step (median round)", "model ms/step",
                                "dense / model (median of rounds)", "range over rounds", "median of per-step ratios"],
                               rows, markdown=True), ""]
    lines += ["## Targets", "",
              "A decode target's measured value: the paired step-by-step reading above (median over rounds of dense's "
              "seconds / the model's); the repeats' readings are in the JSON (`ratios`: `decode`, `decode_paired`)."
              if rows else
              "A decode target's measured value (this run predates the paired step-by-step reading, "
              "--interleaved-rounds) is the lower of two readings of the same repeats: the ratio of the two models' "
              "median decode times, and the median of the per-repeat ratios (each repeat times every model once, so "
              "this one is paired); both are in the JSON (`ratios`: `decode`, `decode_paired`).", ""]
    lines += [format_table(["dtype", "model", "target", "measured", "met"],
                           [[c["dtype"], c["model"], c["target"],
                             f"{c['value']:.3f}" + (f" (expected {c['expected']:.3f})" if "expected" in c else ""),
                             "yes" if c["met"] else "**no**"] for c in results["targets"]], markdown=True), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="model alias, directory or hub id (default %(default)s)")
    p.add_argument("--out", default="results/inference_speed", help="output prefix: writes .json and .md")
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=list(STRUCTURES))
    p.add_argument("--reductions", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prefill-batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--interleaved-rounds", type=int, default=8,
                   help="rounds of decode steps alternated with dense's for each @20%% model, the decode target's "
                        "reading (0 = skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--memory-batch", type=int, default=1, help="prefill batch of the peak-memory run")
    p.add_argument("--lock", default="/tmp/jointrank-cpu.lock",
                   help="shared CPU lock file: held shared to build and measure memory, exclusive to time ('' = none)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="recompute ratios and targets from a results JSON's timings and rewrite it and its .md")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.render:  # the report's arithmetic again on the recorded timings (nothing is measured)
        path = Path(args.render)
        results = json.loads(path.read_text())
        results["ratios"] = ratios(results)  # first: the targets and the bound read them
        results["targets"], results["bound"] = targets(results), bound(results)
        path.write_text(json.dumps(results, indent=1, default=str))
        path.with_suffix(".md").write_text(markdown(results))
        return 0
    torch.set_num_threads(args.threads)
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    import transformers

    from jointrank.modules import LowRankLinear

    lock = open(args.lock, "a") if args.lock else None

    def hold(mode, what):
        if lock is not None:
            log(f"waiting for the {what} lock on {args.lock}")
            fcntl.flock(lock, mode)
            log("got it")

    hold(fcntl.LOCK_SH, "shared")
    models, params = build_models(args, log)
    memory = {} if args.no_memory else measure_memory(args, models, log)
    started_s = time.perf_counter() - t0
    results = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "started": started,
        "model": args.model,
        "args": vars(args),
        "machine": {"cpu": platform.processor() or _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "params": params,
        "lm_head_params": models["dense"].lm_head.weight.numel(),
        "column_major_dtypes": [str(d).removeprefix("torch.") for d in LowRankLinear.column_major_dtypes],
        "timing": {},
        "memory": memory,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if memory:  # written now, so sizes survive even if the exclusive lock never comes
        partial = {**results, "status": "timing not run yet: waiting for the exclusive CPU lock", "seconds": started_s}
        out.with_name(out.name + ".json").write_text(json.dumps(partial, indent=1, default=str))
        out.with_name(out.name + ".md").write_text(markdown(partial))
        log(f"wrote sizes to {out}.json/.md")
    hold(fcntl.LOCK_EX, "exclusive")
    for dtype in args.dtypes:
        for model in models.values():
            model.to(getattr(torch, dtype))  # the shared embedding is cast once, then left alone
        log(f"timing {dtype}")
        results["timing"][dtype] = time_all(models, args, dtype, log)
    if lock is not None:
        fcntl.flock(lock, fcntl.LOCK_UN)
    del models
    gc.collect()
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    results["bound"] = bound(results)
    results["seconds"] = time.perf_counter() - t0
    out.with_name(out.name + ".json").write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results)
    out.with_name(out.name + ".md").write_text(text)
    print(text)
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
