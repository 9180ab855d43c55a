"""Bad inputs a careful user can give, as a table: shared by tests/test_bad_inputs.py and research/bench/reliability.py.

Each case builds what it needs in its own directory (from a few shared pristine sources, which must never change)
and gives the command line. Expected: exit code 1, exactly one stderr line "jointrank: error: ..." containing
`message`, no traceback, and nothing new on disk.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable  # (base: Base, work: Path) -> argv
    message: str  # must appear in the error line
    needs: str | None = None  # a module that must be importable (else the case is skipped)
    hide: str | None = None  # a module made to look uninstalled (importlib.util.find_spec returns None)


@dataclass
class Base:
    """Pristine inputs built once: a tiny Llama (single file and sharded), a compressed checkpoint, results."""

    root: Path
    llama: Path
    sharded: Path
    compressed: Path
    results: Path

    @classmethod
    def build(cls, root: Path) -> "Base":
        from conftest import tiny_model
        from trust_cases import make_checkpoint

        root.mkdir(parents=True, exist_ok=True)
        llama = root / "llama"
        tiny_model("llama").save_pretrained(llama)
        sharded = root / "sharded"
        tiny_model("llama").save_pretrained(sharded, max_shard_size="60KB")
        compressed = make_checkpoint(root / "compressed", "llama")
        from jointrank.evaluate.report import SCHEMA

        results = root / "results.json"
        results.write_text(json.dumps({"schema": SCHEMA, "results": {"piqa": {"acc": 0.6, "acc_stderr": 0.01}}}))
        return cls(root, llama, sharded, compressed, results)


def _copy(src: Path, work: Path, name: str = "src") -> Path:
    return Path(shutil.copytree(src, work / name))


def _edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _poison(path: Path, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 5] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def _compress(src, out, *extra) -> list:
    return ["compress", src, "--qk", "joint", "--ratio", "0.5", "--out", out, *extra]


def _truncated(b, w):
    src = _copy(b.llama, w)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return _compress(src, w / "out")


def _garbage_weights(b, w):
    src = _copy(b.llama, w)
    (src / "model.safetensors").write_bytes(os.urandom(4096))
    return _compress(src, w / "out")


def _garbage_config(stream):
    def setup(b, w):
        src = _copy(b.llama, w)
        (src / "config.json").write_text("this is not json {")
        return _compress(src, w / "out", *(["--stream"] if stream else []))
    return setup


def _unknown_type(b, w):
    return _compress(_edit_config(_copy(b.llama, w), model_type="llamazilla"), w / "out")


def _fake_gguf(b, w):
    (w / "model.gguf").write_bytes(b"definitely not a gguf" * 10)
    return _compress(w / "model.gguf", w / "out")


def _missing_shard(b, w):
    src = _copy(b.sharded, w)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (src / sorted(set(index["weight_map"].values()))[-1]).unlink()
    return _compress(src, w / "out")


def _index_lies(stream):
    def setup(b, w):
        src = _copy(b.sharded, w)
        path = src / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        shards = sorted(set(index["weight_map"].values()))
        name = next(k for k, v in index["weight_map"].items() if v == shards[0])
        index["weight_map"][name] = shards[-1]
        path.write_text(json.dumps(index))
        return _compress(src, w / "out", *(["--stream"] if stream else []))
    return setup


def _args(*extra, out="out"):
    return lambda b, w: _compress(b.llama, w / out, *extra)


def _out_under_file(b, w):
    (w / "afile").write_text("x")
    return _compress(b.llama, w / "afile" / "out")


def _out_is_source(stream):
    def setup(b, w):
        src = _copy(b.llama, w)
        return _compress(src, src, "--overwrite", *(["--stream"] if stream else []))
    return setup


def _out_inside_source(b, w):
    src = _copy(b.llama, w)
    return _compress(src, src / "sub", "--overwrite")


def _out_contains_source(b, w):
    src = _copy(b.llama, w / "models", "src")
    return _compress(src, w / "models", "--overwrite")


def _calibration(content: bytes, method="asvd"):
    def setup(b, w):
        (w / "calib.txt").write_bytes(content)
        return ["compress", b.llama, "--qk", "separate", "--ratio", "0.5", "--method", method, "--calibration",
                w / "calib.txt", "--out", w / "out"]
    return setup


def _nan(stream, value=float("nan"), *extra):
    def setup(b, w):
        src = _poison(_copy(b.llama, w), value)
        return _compress(src, w / "out", *(["--stream"] if stream else []), *extra)
    return setup


def _existing_out(b, w):
    (w / "out").mkdir()
    (w / "out" / "keep.txt").write_text("mine")
    return _compress(b.llama, w / "out")


def _partial(progress: dict | None):
    def setup(b, w):
        staging = w / ".out.partial"
        staging.mkdir()
        if progress is not None:
            (staging / "progress.json").write_text(json.dumps(progress))
        return _compress(b.llama, w / "out", "--stream", *(["--resume"] if progress else []))
    return setup


def _live_staging(b, w):
    (w / f".out.tmp-{os.getpid()}-abcd").mkdir()  # this (live, Python) process stands for another run
    return _compress(b.llama, w / "out")


def _plan(*extra):
    return lambda b, w: ["plan", b.llama, "--qk", "joint", "--ratio", "0.5", *[e(w) if callable(e) else e
                                                                            for e in extra]]


def _plan_garbage_config(b, w):
    src = _copy(b.llama, w)
    (src / "config.json").write_text("[1, 2")
    return ["plan", src, "--qk", "joint", "--ratio", "0.5"]


def _info_manifest(content: str):
    def setup(b, w):
        ckpt = _copy(b.compressed, w)
        (ckpt / "jointrank_manifest.json").write_text(content)
        return ["info", ckpt]
    return setup


def _info_tampered(b, w):
    from trust_cases import factor_tensor_deleted

    ckpt = _copy(b.compressed, w)
    factor_tensor_deleted(ckpt)
    return ["info", ckpt]


def _eval_tampered(b, w):
    from trust_cases import shared_flipped_everywhere

    ckpt = _copy(b.compressed, w)
    shared_flipped_everywhere(ckpt)
    return ["eval", ckpt, "--tasks", "wikitext2", "--data-dir", _data_dir(w)]


def _data_dir(w: Path) -> Path:
    d = w / "data" / "wikitext-2-raw"
    d.mkdir(parents=True, exist_ok=True)
    (d / "wiki.test.raw").write_text(" = Title = \n some text for perplexity \n" * 20)
    return w / "data"


def _eval_out_dir(b, w):
    (w / "res.json").mkdir()
    return ["eval", b.llama, "--tasks", "wikitext2", "--data-dir", _data_dir(w), "--out", w / "res.json"]


def _compare(results_entry):
    def setup(b, w):
        from jointrank.evaluate.report import SCHEMA

        data = {"schema": SCHEMA}
        if results_entry is not None:
            data["results"] = results_entry
        (w / "other.json").write_text(json.dumps(data))
        return ["compare", b.results, w / "other.json"]
    return setup


def _compare_bos(b, w):
    """Two perplexities of which one started every window with BOS: not the same measurement."""
    from jointrank.evaluate.report import SCHEMA

    for name, bos in (("a.json", False), ("b.json", True)):
        entry = {"perplexity": 20.0, "seqlen": 16, "windows": 3, "window_bos": bos}
        (w / name).write_text(json.dumps({"schema": SCHEMA, "model": {"spec": name}, "results": {"wikitext2": entry}}))
    return ["compare", w / "a.json", w / "b.json"]


def _compare_garbage(b, w):
    (w / "other.json").write_text("{{{{")
    return ["compare", b.results, w / "other.json"]


CASES = [
    # broken sources
    Case("truncated safetensors", _truncated, "truncated"),
    Case("random bytes as safetensors", _garbage_weights, "not a valid safetensors file"),
    Case("garbage config.json", _garbage_config(False), "is not valid JSON"),
    Case("garbage config.json --stream", _garbage_config(True), "is not valid JSON"),
    Case("unknown model_type", _unknown_type, "unknown to transformers"),
    Case("fake .gguf", _fake_gguf, "is not a GGUF file"),
    Case("shard missing from a sharded source", _missing_shard, "which is missing"),
    Case("shard index names the wrong shard", _index_lies(False), "does not hold it"),
    Case("shard index names the wrong shard --stream", _index_lies(True), "does not hold it"),
    Case("model not found", lambda b, w: _compress(w / "nope", w / "out"), "model not found"),
    Case("directory that is not a model", lambda b, w: (w / "empty").mkdir() or _compress(w / "empty", w / "out"),
         "is a directory but not a model"),
    Case("a file that is not a model", lambda b, w: (w / "x.txt").write_text("hi") and _compress(w / "x.txt",
                                                                                                w / "out"),
         "is a file but not a .gguf"),
    Case("compress an already compressed checkpoint", lambda b, w: _compress(b.compressed, w / "out"),
         "already a jointrank checkpoint"),
    Case("NaN weight", _nan(False), "non-finite values (NaN or Inf) in model.layers.1.self_attn.q_proj.weight"),
    Case("NaN weight --stream", _nan(True), "non-finite values (NaN or Inf) in model.layers.1.self_attn.q_proj"),
    Case("Inf weight --solver gram", _nan(False, float("inf"), "--solver", "gram"), "non-finite"),
    Case("NaN weight --stream --solver rsvd", _nan(True, float("nan"), "--solver", "rsvd"), "non-finite"),
    # where the output goes
    Case("--out equal to the source, --overwrite", _out_is_source(False), "is the source model"),
    Case("--out equal to the source, --overwrite --stream", _out_is_source(True), "is the source model"),
    Case("--out inside the source", _out_inside_source, "is inside the source model"),
    Case("--out containing the source", _out_contains_source, "contains the source model"),
    Case("--out under a file", _out_under_file, "is a file, not a directory"),
    Case("--out in an unwritable place", lambda b, w: _compress(b.llama, "/proc/jointrank-test/out"),
         "not writable"),
    Case("--out exists", _existing_out, "already exists; pass --overwrite"),
    Case("--out being written by a live run", _live_staging, "another jointrank run"),
    Case("interrupted stream run without --resume", _partial(None), "pass --resume"),
    Case("--resume with other settings", _partial({"fingerprint": "x", "settings": {"solver": "svd"}, "layers": {}}),
         "solver 'svd' then, 'auto' now"),
    # flags
    Case("--device cuda without CUDA", _args("--device", "cuda"), "CUDA is not available"),
    Case("--device bogus", _args("--device", "tpu9000"), "not a device name"),
    Case("--workers 0", _args("--workers", "0"), "--workers must be at least 1"),
    Case("--workers negative", _args("--workers", "-3", "--stream"), "--workers must be at least 1"),
    Case("--layers last:0", _args("--layers", "last:0"), "selects no layers"),
    Case("--ratio 0", _args("--ratio", "0"), "ratio must be in (0, 1]"),
    Case("--rank too large", lambda b, w: ["compress", b.llama, "--qk", "joint", "--rank", "1000", "--out",
                                           w / "out"], "exceeds min(d_out, d_in)"),
    Case("unknown layer spec", _args("--layers", "middle:2"), "unknown layer spec"),
    Case("layers outside the model", lambda b, w: ["compress", b.llama, "--gate-up", "joint@0-7", "--ratio", "0.5",
                                                   "--out", w / "out"], "is outside layers 0-2"),
    Case("joint on a one-member group", lambda b, w: ["compress", b.llama, "--v", "joint", "--ratio", "0.5", "--out",
                                                      w / "out"], "cannot be joint"),
    Case("impossible --target", lambda b, w: ["compress", b.llama, "--qk", "joint", "--target", "0.9", "--out",
                                              w / "out"], "cannot remove 90.0%"),
    Case("--eval unknown task", _args("--eval", "nosuchtask"), "unknown task nosuchtask"),
    Case("--eval piqa without lm-eval", _args("--eval", "piqa"), "needs lm-eval", hide="lm_eval"),
    Case("--eval-window-bos without --eval", _args("--eval-window-bos"), "only apply with --eval"),
    Case("--backend ray without Ray", _args("--backend", "ray"), "needs Ray", hide="ray"),
    Case("--eval with --stream", _args("--eval", "wikitext2", "--stream"), "need the whole model in memory"),
    Case("--stream from a .gguf", lambda b, w: (w / "m.gguf").write_bytes(b"GGUF" + bytes(60)) and _compress(
        w / "m.gguf", w / "out", "--stream"), "streaming reads a local Hugging Face directory"),
    Case("random bytes as calibration text", _calibration(os.urandom(1 << 15)), "not UTF-8 text"),
    Case("empty calibration file", _calibration(b""), "is empty"),
    Case("NUL bytes in calibration text", _calibration(b"hello\x00world\n" * 50), "NUL bytes"),
    Case("calibration for a data-free method", _calibration(b"some text\n", method="svd"), "is data-free"),
    Case("data-aware method without calibration", lambda b, w: ["compress", b.llama, "--qk", "separate", "--ratio",
                                                                "0.5", "--method", "asvd", "--out", w / "out"],
         "needs calibration text"),
    # plan, info, eval, compare, watermark
    Case("plan --json into a missing directory", _plan("--json", lambda w: w / "nodir" / "plan.json"),
         "does not exist"),
    Case("plan --json naming a directory", _plan("--json", lambda w: w), "is a directory"),
    Case("plan on a garbage config.json", _plan_garbage_config, "is not valid JSON"),
    Case("info on a garbage manifest", _info_manifest("]]not json"), "is not valid JSON"),
    Case("info on an empty manifest", _info_manifest(""), "is not valid JSON"),
    Case("info on a manifest of another kind", _info_manifest('{"hello": 1}'), "not a jointrank manifest"),
    Case("info on a directory that is no checkpoint", lambda b, w: ["info", b.llama], "is not a jointrank checkpoint"),
    Case("info on a checkpoint missing a factor", _info_tampered, "does not match its config.json"),
    Case("eval on a tampered checkpoint", _eval_tampered, "does not match its config.json",
         needs="jointrank.evaluate.cli"),
    Case("eval --out naming a directory", _eval_out_dir, "is a directory", needs="jointrank.evaluate.cli"),
    Case("eval unknown task", lambda b, w: ["eval", b.llama, "--tasks", "nope"], "unknown task nope",
         needs="jointrank.evaluate.cli"),
    Case("compare: file without results", _compare(None), "has no results", needs="jointrank.evaluate.cli"),
    Case("compare: string accuracies", _compare({"piqa": {"acc": "0.7"}}), "not a number",
         needs="jointrank.evaluate.cli"),
    Case("compare: BOS windows against standard windows", _compare_bos, "not comparable",
         needs="jointrank.evaluate.cli"),
    Case("compare: garbage JSON", _compare_garbage, "is not valid JSON", needs="jointrank.evaluate.cli"),
    Case("compare: missing file", lambda b, w: ["compare", b.results, w / "nope.json"], "results file not found",
         needs="jointrank.evaluate.cli"),
    # watermark is research code now (python -m research.experiments): tests/test_experiments.py covers it
]


def available(case: Case) -> bool:
    return case.needs is None or importlib.util.find_spec(case.needs.split(".")[0]) is not None and _importable(
        case.needs)


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_case(case: Case, base: Base, work: Path) -> dict:
    """Run one case in-process; returns what happened (code, stderr lines, new files, source untouched)."""
    import contextlib
    import io

    from jointrank.cli import main

    work.mkdir(parents=True, exist_ok=True)
    argv = [str(a) for a in case.setup(base, work)]
    before, base_before = snapshot(work), _fingerprint(base.root)
    err, out = io.StringIO(), io.StringIO()
    real_find_spec = importlib.util.find_spec
    if case.hide:
        importlib.util.find_spec = lambda name, *a, **k: None if name == case.hide else real_find_spec(name, *a, **k)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code
            except Exception as exc:  # a traceback a user would see
                import traceback

                code, _ = "traceback", traceback.print_exc(file=err)
                err.write(f"{type(exc).__name__}: {exc}\n")
    finally:
        importlib.util.find_spec = real_find_spec
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return {"case": case.name, "argv": argv, "code": code, "stderr": lines,
            "new_files": sorted(snapshot(work) - before), "source_changed": _fingerprint(base.root) != base_before}


def _fingerprint(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def verdict(case: Case, outcome: dict) -> str:
    """'ok' or what is wrong with the outcome."""
    lines = outcome["stderr"]
    if outcome["code"] != 1:
        return f"exit {outcome['code']}"
    if len(lines) != 1:
        return f"{len(lines)} stderr lines"
    if not lines[0].startswith("jointrank: error: ") or "Traceback" in lines[0]:
        return "not a jointrank error line"
    if case.message not in lines[0]:
        return f"message lacks {case.message!r}"
    if outcome["new_files"]:
        return f"left {outcome['new_files'][:3]}"
    if outcome["source_changed"]:
        return "changed a pristine source"
    return "ok"


def quiet_transformers() -> None:
    """No progress bars or load reports on stderr: the error line must be the only line."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
