"""Low rank and quantisation together on Gemma-3-270M: quality against bytes, each setting against quantisation alone.

    python research/bench/quantize.py run [--only NAME,...] [--max-minutes 120]   # resumable -> results/quantize.json
    python research/bench/quantize.py report        # results/quantize.md + quantize.png from results/quantize.json

Settings (SETTINGS): dense float32; quantisation alone (int8, int4, int4-g32); the best low-rank rows without user
data of results/quality.md (self-generated calibration, distillation alone; SVD-LLM at 10%, loss-aware LLM-ROM at
20% and 30% of the decoder), in float32, with each scheme, and with each scheme after quantisation-aware healing
("+qat": QAT_STEPS more distillation steps seeing every weight as the scheme stores it, on the row's calibration
windows; what `compress --quantize S --heal distill` does by default). A low-rank model is built once
(research/bench/quality.py's `build`, the same deterministic steps as its quality.json point) and kept in
.cache/quantize/ so each scheme quantises the same factors. A point measured for another row than the current one
is moved to `superseded` and measured again.

Every point runs in a fresh process: build or load the float model, quantise (timed), save the checkpoint as a user
would (jointrank.save, or save_pretrained without low-rank units), reload it through AutoModelForCausalLM
.from_pretrained after `import jointrank`, and measure on the reloaded model:
  * bytes on disk (the safetensors files) and in memory (every parameter and buffer storage of the reloaded model),
    per tensor kind; nothing is computed from bit widths;
  * WikiText-2 perplexity with results/quality.md's protocol (the same 32 seeded windows of 512 tokens), per-window
    NLL kept, paired against this file's dense point. The windows run through the dequantized weights: the same
    function (checked on the first window, `max_logit_diff` in each point; tests/test_quantize.py asserts it), several
    times faster on a CPU, where quanto dequantizes inside every matmul.
Decode and prefill speed are measured by research/bench/inference_speed.py (a timing needs a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from research.bench import quality  # noqa: E402
from research.common import write_json  # noqa: E402

RESULTS = REPO / "results" / "quantize.json"
OUT_MD, OUT_PNG = REPO / "results" / "quantize.md", REPO / "results" / "quantize.png"
BUILT = quality.CACHE / "quantize"  # float low-rank checkpoints, built once per row (gitignored)

# name -> (quality.py row or None for dense, budget, scheme or None for float, quantisation-aware healing steps)
# the best healed rows without user data at each budget (results/quality.md): self-generated text, distillation at
# lr 3e-5 (the tool's default; lr 1e-4 healed mostly BOS-less window starts: results/heal_zeroshot.md). Points
# measured for older rows are set aside under `superseded` by `run` and measured again.
LOW_RANK = {0.10: "svd_llm/self/distill-lr3e-5", 0.20: "loss-llm_rom/self/distill-lr3e-5",
            0.30: "loss-llm_rom/self/distill-lr3e-5"}
QAT_STEPS = 32  # "+qat": distillation steps seen through the scheme (heal.DistillSettings.quantized_steps)
SCHEME_NAMES = ("int8", "int4", "int4-g32")
SETTINGS: dict[str, tuple[str | None, float, str | None, int]] = {
    "dense": (None, 0.0, None, 0),
    **{s: (None, 0.0, s, 0) for s in SCHEME_NAMES},
}
for _b, _row in LOW_RANK.items():
    SETTINGS[f"lr{round(_b * 100)}"] = (_row, _b, None, 0)
    for _scheme in SCHEME_NAMES:
        SETTINGS[f"lr{round(_b * 100)}+{_scheme}"] = (_row, _b, _scheme, 0)
        SETTINGS[f"lr{round(_b * 100)}+{_scheme}+qat"] = (_row, _b, _scheme, QAT_STEPS)


def storage_bytes(model) -> dict:
    """Bytes of every distinct tensor storage the model holds (parameters and buffers), by tensor kind."""
    from jointrank.format import tensor_kind

    seen, kinds = set(), {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        kind = tensor_kind(name, tuple(t.shape))
        kinds[kind] = kinds.get(kind, 0) + t.untyped_storage().nbytes()
    return {"total": sum(kinds.values()), **kinds}


def disk_bytes(directory: Path) -> dict:
    from jointrank.format import tensor_kind
    from jointrank.verify import stored_tensors

    kinds = {}
    for name, t in stored_tensors(directory).items():
        kind = tensor_kind(name, t.shape)
        kinds[kind] = kinds.get(kind, 0) + (t.end - t.start)
    files = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return {"total": files, **kinds}


def float_model(row: str | None, budget: float):
    """(model, tokenizer, facts, checkpoint dir or None): dense from the zoo, or the low-rank row built once."""
    import jointrank
    from jointrank.sources import load_model

    if row is None:
        model, tokenizer, _ = load_model(quality.P.model)
        return model, tokenizer, {}, None
    built = BUILT / f"{row.replace('/', '_')}@{budget}"
    facts_file = built / "bench_facts.json"
    if not facts_file.is_file():
        shutil.rmtree(built, ignore_errors=True)
        model, tokenizer, facts, result = quality.build(row, budget, with_result=True)
        jointrank.save(model, tokenizer, built, result, source=quality.P.model)
        facts_file.write_text(json.dumps(facts, indent=2))
        shutil.rmtree(quality.heal_state_dir(row, budget), ignore_errors=True)  # built and saved: not needed again
        return model, tokenizer, facts, built
    model, tokenizer, _ = load_model(str(built))
    return model, tokenizer, json.loads(facts_file.read_text()), built


def heal_quantized(model, row: str, scheme: str, steps: int) -> dict:
    """Quantisation-aware healing of a healed low-rank model, as `compress --quantize S --heal-quantized-steps N`
    does after its float distillation: the dense model's final states on the row's calibration windows (the same
    cached text), then `steps` distillation steps with every weight seen through the scheme (fake_quantize_)."""
    from dataclasses import asdict

    from jointrank.heal import DistillSettings, distill_, teacher_states
    from jointrank.methods.calibration import load_text
    from jointrank.methods.selfgen import self_calibration
    from jointrank.quantize import fake_quantize_
    from jointrank.sources import load_model

    _, cal_kind, heal = quality.parse_row(row)
    dense, tokenizer, _ = load_model(quality.P.model)
    calibration = (self_calibration(dense, tokenizer, quality.CAL_TOKENS, cache_dir=quality.CACHE, progress=False)
                   if cal_kind == "self" else load_text(quality.C4_FILE, tokenizer, tokens=quality.CAL_TOKENS,
                                                        seqlen=512, seed=0))
    settings = DistillSettings(steps=steps, lr=quality.heal_recipe(heal)[1],  # the row's own learning rate
                               **({"head_dtype": quality.P.head_dtype} if quality.P.head_dtype else {}))
    states = teacher_states(dense, calibration.input_ids, progress=False)
    del dense
    fake_quantize_(model, scheme)
    done = distill_(model, states, calibration.input_ids, settings, progress=False)
    return {k: v for k, v in asdict(done).items() if k != "settings"} | {"settings": asdict(settings)}


def cmd_point(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import jointrank
    from jointrank.quantize import dequantized_copy

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    row, budget, scheme, qat_steps = SETTINGS[args.name]
    model, tokenizer, facts, built = float_model(row, budget)
    point = {"name": args.name, "row": row, "budget": budget, "scheme": scheme, "quantized_steps": qat_steps,
             "decoder_reduction": facts.get("decoder_reduction", 0.0)}
    with tempfile.TemporaryDirectory(dir=BUILT.parent if BUILT.parent.is_dir() else None) as tmp:
        out = Path(tmp) / "checkpoint"
        if qat_steps:
            t = time.perf_counter()
            point["heal_quantized"] = heal_quantized(model, row, scheme, qat_steps)
            point["heal_quantized_seconds"] = time.perf_counter() - t
        if scheme is not None:
            t = time.perf_counter()
            point["quantization"] = jointrank.quantize_(model, scheme).to_dict()
            point["quantize_seconds"] = time.perf_counter() - t
        if built is not None:  # the built checkpoint's manifest, with the quantisation added as compress does
            from jointrank.checkpoint import write_checkpoint

            manifest = {k: v for k, v in jointrank.read_manifest(built).items()
                        if k not in ("format", "created", "versions", "checksums")}
            if scheme is not None:
                manifest["result"].setdefault("extra", {})["quantization"] = point["quantization"]
            write_checkpoint(model, tokenizer, out, manifest)
        else:
            model.save_pretrained(out)
        point["bytes_on_disk"] = disk_bytes(out)
        point["load_peak_rss_gib"] = load_peak_rss_gib(out)
        del model
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        point["bytes_in_memory"] = storage_bytes(reloaded)
        evaluated = dequantized_copy(reloaded) if scheme is not None else reloaded
        windows, _, _ = quality.eval_windows(tokenizer)
        if scheme is not None:
            with torch.no_grad():
                a = reloaded(windows[:1]).logits
                b = evaluated(windows[:1]).logits
            point["max_logit_diff"] = (a - b).abs().max().item()
            point["logit_scale"] = b.abs().max().item()
        point["perplexity"] = quality.measure_perplexity(evaluated, tokenizer)
        if args.zeroshot:  # results/quality.md's seven tasks and documents, paired per document against dense
            point["zeroshot"] = quality.measure_zeroshot(evaluated, tokenizer)
    point["peak_rss_gib"] = quality.peak_rss_gib()
    point["load_avg_1min"] = os.getloadavg()[0]
    print("POINT " + json.dumps(point), flush=True)
    return 0


LOAD_CHILD = """import resource, sys
import jointrank  # registers the quantizer, as a user's `import jointrank` does
from transformers import AutoModelForCausalLM
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import torch
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():  # one short forward: weights memory-mapped by the loader are only resident once used
    model(torch.tensor([[2, 3, 4, 5]]))
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def load_peak_rss_gib(checkpoint: Path) -> dict:
    """Peak RSS of a fresh process that imports jointrank, loads the checkpoint through transformers and runs one
    4-token forward (what a user's process holds, ready to generate), and the part loading and running added."""
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(checkpoint)], capture_output=True, text=True,
                          check=True)
    before, after = (int(x) / 2**20 for x in proc.stdout.split()[-2:])  # Linux reports KiB
    return {"process": after, "load": after - before}


# --------------------------------------------------------------------------------------------------- speed

SPEED = ("dense", "int8", "int4", "int4-g32", "lr10", "lr10+int4")  # lr10 rows need `run` to have built lr10


def cmd_speed(args) -> int:
    """Prefill and decode tokens/s of each setting against dense, in this one process, medians over repeats in
    rotating order (research/bench/inference_speed.py's timers). Needs a quiet machine: check `uptime` first."""
    import statistics

    import torch

    import jointrank
    from research.bench.inference_speed import time_generate, time_prefill

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    models = {}
    for name in SPEED:
        row, budget, scheme, _ = SETTINGS[name]
        if row is not None and not (BUILT / f"{row.replace('/', '_')}@{budget}" / "bench_facts.json").is_file():
            print(f"{name}: not built yet (run `quantize.py run --only {name}` first); skipped", flush=True)
            continue
        model, tokenizer, _, _ = float_model(row, budget)
        if scheme is not None:
            jointrank.quantize_(model, scheme)
        models[name] = model.eval()
    gen = torch.Generator().manual_seed(0)
    vocab = models["dense"].config.vocab_size
    prefill = torch.randint(0, vocab, (1, args.prefill_len), generator=gen)
    prompt = torch.randint(0, vocab, (1, 16), generator=gen)
    names = list(models)
    samples = {n: {"prefill": [], "decode": []} for n in names}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        for n in names:  # warm-up
            time_prefill(models[n], prefill[:, :32])
            time_generate(models[n], prompt, 2)
        for rep in range(args.repeats):
            for n in names[rep % len(names):] + names[:rep % len(names)]:
                samples[n]["prefill"].append(time_prefill(models[n], prefill))
                one = time_generate(models[n], prompt, 1)
                samples[n]["decode"].append(time_generate(models[n], prompt, args.decode_tokens) - one)
            load.append(os.getloadavg()[0])
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    out = {}
    for n in names:
        out[n] = {"prefill_tokens_per_s": args.prefill_len / statistics.median(samples[n]["prefill"]),
                  "decode_tokens_per_s": (args.decode_tokens - 1) / statistics.median(samples[n]["decode"]),
                  "prefill_seconds": samples[n]["prefill"], "decode_seconds": samples[n]["decode"]}
    for n in names:
        out[n]["prefill_vs_dense"] = out[n]["prefill_tokens_per_s"] / out["dense"]["prefill_tokens_per_s"]
        out[n]["decode_vs_dense"] = out[n]["decode_tokens_per_s"] / out["dense"]["decode_tokens_per_s"]
    results = load_results()
    results["speed"] = {"settings": {"prefill_len": args.prefill_len, "decode_tokens": args.decode_tokens,
                                     "repeats": args.repeats, "threads": torch.get_num_threads(),
                                     "dtype": "float32"},
                        "load_avg_1min": load, "models": out}
    save(results)
    for n in names:
        print(f"{n}: prefill {out[n]['prefill_vs_dense']:.2f}x dense, decode {out[n]['decode_vs_dense']:.2f}x dense")
    return 0


# --------------------------------------------------------------------------------------------------- the sweep


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"points": []}


def run_point(name: str, zeroshot: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "point", name] + ["--zeroshot"] * zeroshot
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("POINT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"name": name, "error": " | ".join(tail)}
    point = json.loads(lines[-1][len("POINT "):])
    point["process_seconds"] = time.perf_counter() - t
    return point


def is_stale(point: dict) -> bool:
    """Measured for another low-rank row or healing than SETTINGS names now (or for a setting no longer listed)."""
    if point["name"] not in SETTINGS:
        return True
    row, _, _, qat_steps = SETTINGS[point["name"]]
    return point["row"] != row or point.get("quantized_steps", 0) != qat_steps


def current_points(results: dict) -> dict[str, dict]:
    """{setting name: point} of the measured points that are today's settings (stale ones wait for `run`)."""
    return {p["name"]: p for p in results["points"] if "perplexity" in p and not is_stale(p)}


def cmd_run(args) -> int:
    deadline = time.monotonic() + args.max_minutes * 60
    results = load_results()
    names = ["dense"] + [n for n in (args.only.split(",") if args.only else SETTINGS) if n != "dense"]
    for name in names:
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}: {', '.join(SETTINGS)}")
        # a measured point is skipped, unless zero-shot is asked for and missing: then it is measured again whole
        # (every step is deterministic: the same perplexity, now with zero-shot and today's load-time memory)
        stale = [p for p in results["points"] if p["name"] == name and is_stale(p)]
        if stale:  # measured for another low-rank row than the current one: kept aside, measured again
            results.setdefault("superseded", []).extend(stale)
            results["points"] = [p for p in results["points"] if p not in stale]
        # dense's zero-shot is results/quality.json's (the same model, tasks and documents): not measured twice
        zs_done = not args.zeroshot or (name == "dense" and quality_dense() is not None)
        if any(p["name"] == name and "perplexity" in p and (zs_done or "zeroshot" in p)
               and (not args.bos or quality.BOS in p["perplexity"]) for p in results["points"]):
            continue
        if time.monotonic() > deadline:
            print("time budget of this piece used up; run again to continue", flush=True)
            return 3
        point = run_point(name, zeroshot=args.zeroshot)
        results["points"] = [p for p in results["points"] if p["name"] != name] + [point]
        save(results)
        if "error" in point:
            print(f"{name}: FAILED {point['error']}", flush=True)
        else:
            print(f"{name}: ppl {point['perplexity']['perplexity']:.2f}, decoder linear bytes "
                  f"{decoder_bytes(point) / 2**20:.1f} MiB, total {point['bytes_on_disk']['total'] / 2**20:.1f} MiB",
                  flush=True)
    return 0


def save(results: dict) -> None:
    results["settings"] = {"model": quality.P.model, "perplexity": quality.settings()["perplexity"],
                           "low_rank_rows": {f"{b:.0%}": r for b, r in LOW_RANK.items()},
                           "settings": {k: list(v) for k, v in SETTINGS.items()}}
    results["targets"] = targets(results)
    write_json(RESULTS, results)


# ------------------------------------------------------------------------------------------------------ report


def decoder_bytes(point: dict) -> int:
    """Bytes on disk of what low rank and quantisation act on: the decoder's linear layers and factors."""
    b = point["bytes_on_disk"]
    return b.get("low-rank factors", 0) + b.get("dense linear layers", 0)


def windows_key(points: dict) -> str:
    """One protocol for the whole comparison: the windows started with BOS once every point was measured on them
    (results/heal_zeroshot.md: the standard windows flatter healed rows such as lr10), else the standard ones."""
    return quality.nll_key(*points.values()) if points else quality.NO_BOS


def frontier_wins(points: dict) -> list[dict]:
    """Each low-rank + quantised point against each quantisation-alone point it could dominate: no more bytes and
    lower perplexity, or fewer bytes and no higher perplexity, beyond 2 paired SE."""
    key = windows_key(points)
    out = []
    for name, p in points.items():
        if p["row"] is None or p["scheme"] is None:
            continue
        for qname, q in points.items():
            if q["row"] is not None or q["scheme"] is None:
                continue
            d, se = quality.paired_nll(p, q, key)  # NLL of low rank + quant minus quant alone
            bytes_ok = decoder_bytes(p) <= decoder_bytes(q)
            better = (d < -2 * se) or (decoder_bytes(p) < decoder_bytes(q) and d <= 2 * se)
            out.append({"low_rank": name, "quant_alone": qname, "dnll": d, "se": se,
                        "bytes_ratio": decoder_bytes(p) / decoder_bytes(q), "dominates": bytes_ok and better})
    return out


def targets(results: dict) -> list[dict]:
    """The issue's target, read strictly: one low-rank + quantised setting that beats *every* quantisation-alone
    point (each one: lower perplexity at no more bytes, or fewer bytes at no higher perplexity, beyond 2 paired SE)."""
    points = current_points(results)
    wins = frontier_wins(points)
    alone = sorted(n for n, p in points.items() if p["row"] is None and p["scheme"] is not None)
    beating = {}
    for name in sorted({w["low_rank"] for w in wins}):
        beaten = [w["quant_alone"] for w in wins if w["low_rank"] == name and w["dominates"]]
        beating[name] = beaten
    best = max(beating, key=lambda n: len(beating[n]), default=None)
    met = best is not None and len(beating[best]) == len(alone) > 0
    if best is None:
        measured = None
    elif beating[best]:
        measured = f"{best}: beats {len(beating[best])} of {len(alone)} ({', '.join(beating[best])})"
    else:  # nothing dominates: say how far the nearest pair at no more bytes is
        near = min((w for w in wins if w["bytes_ratio"] <= 1), key=lambda w: w["dnll"] - 2 * w["se"], default=None)
        measured = f"none of {len(beating)} low-rank + quantised settings beats any of the {len(alone)}" + (
            f"; nearest at no more bytes: {near['low_rank']} against {near['quant_alone']}, dNLL "
            f"{near['dnll']:+.3f} ± {near['se']:.3f}" if near else "")
    return [{"name": "a low-rank + quantised setting strictly better than every quantisation-alone point "
                     "(decoder bytes on disk; 2 paired SE)",
             "measured": measured, "target": f"beats all {len(alone)}", "met": met, "compared_with": alone,
             "windows": quality.protocol(windows_key(points))}]


def frontier(points: dict, key: str) -> list[str]:
    """The settings no other setting beats on both decoder bytes and mean NLL (point estimates), fewest bytes first."""
    front = [n for n, p in points.items() if not any(
        decoder_bytes(q) <= decoder_bytes(p) and quality.mean_nll(q, key) < quality.mean_nll(p, key)
        for m, q in points.items() if m != n)]
    return sorted(front, key=lambda n: decoder_bytes(points[n]))


def quality_dense() -> dict | None:
    """Dense Gemma-3-270M's zero-shot from results/quality.json: the same model, tasks, documents and seed as this
    bench's, so a point here pairs with it document by document (saves measuring dense twice)."""
    path = REPO / "results" / "quality.json"
    if not path.is_file():
        return None
    return next((p for p in json.loads(path.read_text())["points"] if p["row"] == "dense" and "zeroshot" in p), None)


def write_report(results: dict) -> None:
    points = current_points(results)
    dense = points.get("dense")
    dense_zs = dense if dense and "zeroshot" in dense else quality_dense()
    lines = ["# Low rank and quantisation together: quality against bytes (Gemma-3-270M)", "",
             "Generated by `python research/bench/quantize.py report` from results/quantize.json "
             "(measured by `python research/bench/quantize.py run`). Protocol: see the bench's docstring; perplexity "
             "on the 32 seeded WikiText-2 windows of results/quality.md, paired per window against dense; zero-shot "
             "(`run --zeroshot`) on results/quality.md's seven tasks and documents, paired per document against "
             "dense (dense's from results/quality.json when not measured here: the same model and documents).", "",
             "Bytes are measured: on disk, the safetensors files of the checkpoint as saved; in memory, the storages "
             "of the model reloaded through `AutoModelForCausalLM.from_pretrained`. \"Decoder linear\" is what "
             "low rank and quantisation act on (the decoder's linear layers and factors, with their scales); the "
             "embedding (63% of Gemma-3-270M's parameters, tied to the output head) stays float32 in every row.", "",
             "| setting | decoder removed | scheme | decoder linear MiB | total on disk MiB | in memory MiB | "
             "perplexity | ppl / dense | zero-shot avg (kept ± SE) | quantise s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    key = windows_key(points)
    if key != quality.BOS:
        lines[2:2] = ["**Warning: these perplexities are on windows without BOS**, which flatter healed rows on Gemma "
                      "(every `lr` row here is healed; results/heal_zeroshot.md): the comparisons below move to the "
                      "windows started with BOS once every point has them (`python research/bench/quantize.py run "
                      "--bos` measures the points that lack them).", ""]
    for name in SETTINGS:
        p = points.get(name)
        if p is None:
            continue
        ratio = "1" if name == "dense" or dense is None else \
            f"{quality.ppl_ratio(p, dense, key)[0]:.3f} ± {quality.ppl_ratio(p, dense, key)[1]:.3f}"
        if name == "dense" and dense_zs:  # measured here or, the same model and documents, in results/quality.json
            p = {**p, "zeroshot": dense_zs["zeroshot"]}
        kept = quality.zs_retention(p, dense_zs) if dense_zs and "zeroshot" in p else None
        zs = "-" if "zeroshot" not in p else f"{p['zeroshot']['avg']:.4f}" + (
            f" ({kept[0]:.1%} ± {kept[1]:.1%})" if kept and name != "dense" else "")
        lines.append(f"| {name} | {p['decoder_reduction']:.1%} | {p['scheme'] or 'float32'} | "
                     f"{decoder_bytes(p) / 2**20:.1f} | {p['bytes_on_disk']['total'] / 2**20:.1f} | "
                     f"{p['bytes_in_memory']['total'] / 2**20:.1f} | {quality.perplexity_on(p, key):.2f} | {ratio} | "
                     f"{zs} | {p.get('quantize_seconds', 0) + p.get('heal_quantized_seconds', 0):.1f} |")
    if any(p.get("quantized_steps") for p in points.values()):
        lines += ["", f"`+qat`: the low-rank row's float checkpoint healed {QAT_STEPS} more distillation steps with every "
                  "decoder weight seen as the scheme stores it (rounded on the grid it is saved on, gradient passed "
                  "straight through; the row's own calibration windows and learning rate), then stored on those "
                  "grids: what `jointrank compress --quantize S --heal distill` does by default "
                  "(`--heal-quantized-steps`). Its time is in the last column with the quantisation's."]
    missing = [n for n in SETTINGS if n not in points]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    stale = sorted({p["name"] for p in results["points"] if is_stale(p)})
    if stale:
        lines += ["", f"Measured for an earlier low-rank row (left out above; `run` measures them again for today's "
                      f"rows): {', '.join(stale)}."]
    wins = frontier_wins(points)
    if wins:
        lines += ["", "## Low rank + quantisation against quantisation alone", "",
                  "ΔNLL = mean per-window NLL of the low-rank setting minus the quantisation-alone one (negative: "
                  "low rank + quantisation better), with its paired standard error. Zero-shot: the low-rank "
                  "setting's average accuracy over the quantisation-alone one's, paired per document (where both "
                  "were measured).", "",
                  "| low rank + quant | against | decoder bytes ratio | ΔNLL ± SE | zero-shot ratio ± SE | "
                  "dominates (2 SE) |", "|---|---|---|---|---|---|"]
        for w in wins:
            zs = quality.zs_retention(points[w["low_rank"]], points[w["quant_alone"]])
            lines.append(f"| {w['low_rank']} | {w['quant_alone']} | {w['bytes_ratio']:.3f} | "
                         f"{w['dnll']:+.4f} ± {w['se']:.4f} | {f'{zs[0]:.3f} ± {zs[1]:.3f}' if zs else '-'} | "
                         f"{'yes' if w['dominates'] else 'no'} |")
    front = frontier(points, key)
    if points:
        lines += ["", "## The quality/bytes frontier", "",
                  "Settings no other setting beats on both decoder bytes and perplexity (point estimates), from "
                  "fewest bytes: " + ", ".join(f"{n} ({decoder_bytes(points[n]) / 2**20:.1f} MiB, "
                                               f"{quality.perplexity_on(points[n], key):.2f})" for n in front) + ".",
                  "", "Read with the model's origin in mind: the Gemma-3-270M weights jointrank ships come from a "
                  "Q4_K_M GGUF file, i.e. they already sit on a 4-bit grid with one scale and minimum per 32 "
                  "weights. Groups of 32 (`int4-g32`) match those blocks (though HQQ's fitted scales need not "
                  "find the original grid: how near they come is not measured here), while groups of 128 (`int4`) "
                  "straddle four of them; int8 is lossless on such weights. Low-rank factors are not on any grid, "
                  "so they pay each scheme's full rounding error. A model distributed in 16-bit may give "
                  "quantisation alone less of a head start."]
    speed = results.get("speed")
    if speed:
        st = speed["settings"]
        lines += ["", "## Speed against dense (CPU)", "",
                  f"`python research/bench/quantize.py speed` (one process, {st['threads']} threads, float32, "
                  f"medians of {st['repeats']} repeats in rotating order; prefill: 1 x {st['prefill_len']} tokens; "
                  f"decode: {st['decode_tokens'] - 1} tokens after a 16-token prompt; 1-minute load average "
                  f"{min(speed['load_avg_1min']):.2f}-{max(speed['load_avg_1min']):.2f}).", "",
                  "| setting | prefill tok/s | vs dense | decode tok/s | vs dense | peak RSS GiB after load |",
                  "|---|---|---|---|---|---|"]
        for n, m in speed["models"].items():
            rss = points.get(n, {}).get("load_peak_rss_gib", {}).get("process")
            lines.append(f"| {n} | {m['prefill_tokens_per_s']:.1f} | {m['prefill_vs_dense']:.2f}x | "
                         f"{m['decode_tokens_per_s']:.2f} | {m['decode_vs_dense']:.2f}x | "
                         f"{'—' if rss is None else f'{rss:.2f}'} |")
        slower = [n for n, m in speed["models"].items() if m["decode_vs_dense"] < 1 and n != "dense"]
        if slower:
            lines += ["", f"Decoding is slower than dense for {', '.join(slower)}: optimum-quanto dequantizes "
                      "the weights inside every matmul on a CPU, so quantised storage buys bytes on disk and in "
                      "memory, not speed, here. Peak RSS after load: a fresh process that imports jointrank, "
                      "loads the checkpoint through transformers and runs one 4-token forward (— for points measured before this was recorded)."]
    lines += ["", "## Targets", ""]
    for t in results.get("targets") or targets(results):
        lines.append(f"- {t['name']}: {t['measured'] or 'none'} ({'met' if t['met'] else 'not met'})")
    lines.append("")
    OUT_MD.write_text("\n".join(lines))
    _plot(points, key, front)


def _plot(points: dict, key: str, front: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    def xy(n):
        return decoder_bytes(points[n]) / 2**20, quality.perplexity_on(points[n], key)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if front:  # none before any point is measured
        ax.step(*zip(*map(xy, front)), where="post", color="grey", linestyle="--", linewidth=1,
                label="frontier (fewer bytes or lower perplexity)")
    for scheme, marker in ((None, "o"), ("int8", "s"), ("int4", "^"), ("int4-g32", "v")):
        names = [n for n, p in points.items() if p["scheme"] == scheme]
        if names:
            ax.scatter(*zip(*map(xy, names)), marker=marker, label=scheme or "float32")
            # labels for the frontier, quantisation alone and the float rows; the rest are in results/quantize.md
            for n in names:
                if n in front or points[n]["row"] is None or scheme is None:
                    ax.annotate(n, xy(n), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("decoder linear layers + factors, MiB on disk")
    ax.set_ylabel("WikiText-2 perplexity (32 windows, "
                  + ("each started with BOS)" if key == quality.BOS else "standard: no BOS)"))
    ax.set_yscale("log")
    ax.set_title("Gemma-3-270M: quality against bytes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=120)


def cmd_report(args) -> int:
    results = load_results()
    results["targets"] = targets(results)
    write_report(results)
    print(f"wrote {OUT_MD.relative_to(REPO)} and {OUT_PNG.relative_to(REPO)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="measure the settings not yet in results/quantize.json, each in a process")
    run.add_argument("--only", default="", help=f"comma-separated settings: {', '.join(SETTINGS)}")
    run.add_argument("--max-minutes", type=float, default=120.0, help="start no new point after this long")
    run.add_argument("--zeroshot", action="store_true", help="also zero-shot accuracy (seven tasks, paired per "
                     "document against dense); measured points without it are measured again")
    run.add_argument("--bos", action="store_true", help="measure again the points measured before perplexity was "
                     "also taken on the windows started with BOS")
    run.set_defaults(func=cmd_run)
    point = sub.add_parser("point", help="one setting in this process (what run calls)")
    point.add_argument("name", choices=list(SETTINGS))
    point.add_argument("--zeroshot", action="store_true")
    point.set_defaults(func=cmd_point)
    speed = sub.add_parser("speed", help="prefill/decode tokens/s against dense (run alone on a quiet machine)")
    speed.add_argument("--prefill-len", type=int, default=256)
    speed.add_argument("--decode-tokens", type=int, default=17)
    speed.add_argument("--repeats", type=int, default=3)
    speed.set_defaults(func=cmd_speed)
    report = sub.add_parser("report", help="results/quantize.md and quantize.png from results/quantize.json")
    report.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
