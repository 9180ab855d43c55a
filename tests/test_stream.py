"""Streaming compression: the same checkpoint as in-memory compress_ + save, tensor for tensor; resumable after a
crash with byte-identical output; bounded to what one layer needs; clear errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import jointrank
from jointrank.architectures import describe
from jointrank.checkpoint import save
from jointrank.compress import compress_
from jointrank.errors import JointRankError
from jointrank.plan import GroupRule, JointRankConfig
from jointrank.planning import make_plan
from jointrank.stream import INDEX_NAME, StreamOptions, TensorSource, compress_checkpoint, read_layout

CONFIG = JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint", "last:2"),
                                "v": GroupRule("separate", "0"), "down": GroupRule("separate")}, ratio=0.4)


def tiny(kind: str, path: Path, dtype=torch.float32, shards: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False)
    else:  # qwen2: q/k/v biases and tied embeddings
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(path, max_shard_size="60KB" if shards else "5GB")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path


def saved_tensors(path: Path) -> dict:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def in_memory(src: Path, out: Path, config=CONFIG):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    result = compress_(model, config, progress=False)
    save(model, None, out, result, source=str(src), config=config)
    return result


@pytest.mark.parametrize("kind,shards", [("llama", False), ("qwen2", True)])
def test_streamed_checkpoint_equals_in_memory_one(tmp_path, kind, shards):
    src = tiny(kind, tmp_path / "src", shards=shards)
    if shards:
        assert (src / INDEX_NAME).is_file()  # the source really is sharded
    expected = in_memory(src, tmp_path / "mem")
    streamed = compress_checkpoint(src, tmp_path / "stream", CONFIG, options=StreamOptions(progress=False))

    a, b = saved_tensors(tmp_path / "mem"), saved_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

    r = streamed.result
    assert (r.params_total_before, r.params_total_after, r.params_decoder_before, r.params_decoder_after) == (
        expected.params_total_before, expected.params_total_after, expected.params_decoder_before,
        expected.params_decoder_after)
    assert [u.rel_error for u in r.units] == [u.rel_error for u in expected.units]

    cfg_mem = json.loads((tmp_path / "mem" / "config.json").read_text())["quantization_config"]
    cfg_stream = json.loads((tmp_path / "stream" / "config.json").read_text())["quantization_config"]
    assert cfg_mem == cfg_stream
    index = json.loads((tmp_path / "stream" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(b)
    assert (tmp_path / "stream" / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob(".stream.partial*"))

    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la = jointrank.load(tmp_path / "mem")(ids).logits
        lb = jointrank.load(tmp_path / "stream")(ids).logits
    assert torch.equal(la, lb)
    manifest = jointrank.read_manifest(tmp_path / "stream")
    assert manifest["plan"] == jointrank.read_manifest(tmp_path / "mem")["plan"]


def test_layout_from_headers_matches_describe(tmp_path):
    from transformers import AutoModelForCausalLM

    for kind in ("llama", "qwen2"):
        src = tiny(kind, tmp_path / kind)
        model = AutoModelForCausalLM.from_pretrained(src)
        assert read_layout(TensorSource.open(src)) == describe(model)


def test_float16_source_keeps_float16_factors(tmp_path):
    src = tiny("llama", tmp_path / "src", dtype=torch.float16)
    compress_checkpoint(src, tmp_path / "out", CONFIG, options=StreamOptions(progress=False))
    tensors = saved_tensors(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    with torch.no_grad():
        logits = jointrank.load(tmp_path / "out", dtype=torch.float32)(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_resume_after_a_crash_gives_byte_identical_output(tmp_path):
    src = tiny("llama", tmp_path / "src")
    options = StreamOptions(progress=False, solver="rsvd", seed=3)
    compress_checkpoint(src, tmp_path / "whole", CONFIG, options=options)

    with pytest.raises(RuntimeError, match="test hook"):
        compress_checkpoint(src, tmp_path / "out", CONFIG, options=options, stop_after_layers=1)
    staging = tmp_path / ".out.partial"
    assert staging.is_dir() and not (tmp_path / "out").exists()  # nothing that looks finished
    progress = json.loads((staging / "progress.json").read_text())
    assert list(progress["layers"]) == ["0"]

    with pytest.raises(JointRankError, match="--resume"):  # no silent restart over the kept work
        compress_checkpoint(src, tmp_path / "out", CONFIG, options=options)
    with pytest.raises(JointRankError, match="solver .rsvd. then, .auto. now"):
        compress_checkpoint(src, tmp_path / "out", CONFIG, options=StreamOptions(progress=False, resume=True))

    done = compress_checkpoint(src, tmp_path / "out", CONFIG,
                               options=StreamOptions(progress=False, solver="rsvd", seed=3, resume=True))
    assert done.layers_done_before == 1
    whole, resumed = tmp_path / "whole", tmp_path / "out"
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        if name != "jointrank_manifest.json":
            assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name
    m1, m2 = (json.loads((d / "jointrank_manifest.json").read_text()) for d in (whole, resumed))
    for m in (m1, m2):  # the only differences allowed: when it ran and how long it took
        m.pop("created")
        m["result"].pop("seconds")
        m["result"]["extra"]["stream"].pop("layer_seconds")
        m["result"]["extra"]["stream"].pop("factorise_seconds")
        m["result"]["extra"]["stream"].pop("unit_seconds")
    assert m1 == m2


def test_stream_refuses_what_it_cannot_do(tmp_path):
    src = tiny("llama", tmp_path / "src")
    (tmp_path / "exists").mkdir()
    with pytest.raises(JointRankError, match="already exists"):
        compress_checkpoint(src, tmp_path / "exists", CONFIG, options=StreamOptions(progress=False))
    with pytest.raises(JointRankError, match="no model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        compress_checkpoint(tmp_path / "empty", tmp_path / "o", CONFIG)
    bad = JointRankConfig(rules={"qk": GroupRule("joint")}, target=0.1, method="svd_llm")  # needs calibration
    with pytest.raises(JointRankError, match="in-memory path"):
        compress_checkpoint(src, tmp_path / "o", bad)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial"))


def test_plan_is_the_in_memory_plan(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny("qwen2", tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    preset = jointrank.PRESETS["paper-20"]
    assert make_plan(read_layout(TensorSource.open(src)), preset) == make_plan(describe(model), preset)


def test_cli_stream_flags(tmp_path, capsys):
    from jointrank.cli import main

    src = tiny("llama", tmp_path / "src")
    args = ["compress", str(src), "--qk", "joint", "--ratio", "0.5"]
    assert main(args + ["--stream", "--eval", "wikitext2", "--out", str(tmp_path / "e")]) == 1
    assert "--eval need the whole model in memory" in capsys.readouterr().err
    assert main(args + ["--workers", "2", "--seed", "5", "--dtype", "float16", "--out", str(tmp_path / "o")]) == 0
    assert "streamed 3 layers" in capsys.readouterr().out
    assert {t.dtype for t in saved_tensors(tmp_path / "o").values()} == {torch.float16}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float16"
    manifest = jointrank.read_manifest(tmp_path / "o")
    assert manifest["result"]["extra"]["stream"]["seed"] == 5 and manifest["result"]["extra"]["stream"]["workers"] == 2
    assert jointrank.load(tmp_path / "o").model.layers[0].self_attn.q_proj.rank == 32  # 0.5 * min(64 + 32, 64)
    assert main(args + ["--resume", "--out", str(tmp_path / "o")]) == 1  # finished output: refused, not redone
    assert "already exists" in capsys.readouterr().err


def test_resume_on_another_thread_count_is_refused_naming_it(tmp_path):
    """BLAS rounding depends on the thread count, so a resumed run on other threads would not write the same bytes:
    the thread count is part of the recorded settings, and the refusal says that is what changed."""
    src = tiny("llama", tmp_path / "src")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="test hook"):
            compress_checkpoint(src, tmp_path / "out", CONFIG, options=StreamOptions(progress=False),
                                stop_after_layers=1)
        progress = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())
        assert progress["settings"]["unit_threads"] == 2
        torch.set_num_threads(1)
        with pytest.raises(JointRankError, match="BLAS threads per unit 2 then, 1 now"):
            compress_checkpoint(src, tmp_path / "out", CONFIG, options=StreamOptions(progress=False, resume=True))
        torch.set_num_threads(2)
        done = compress_checkpoint(src, tmp_path / "out", CONFIG, options=StreamOptions(progress=False, resume=True))
        assert done.layers_done_before == 1
    finally:
        torch.set_num_threads(threads)


def test_output_appearing_during_a_run_is_not_replaced(tmp_path, monkeypatch):
    """The final swap never replaces a path this run did not check (it did not exist at the start)."""
    import jointrank.streaming.run as stream

    src = tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    real = stream._assemble

    def someone_else_writes_out(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("not ours")
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "_assemble", someone_else_writes_out)
    with pytest.raises(JointRankError, match="appeared while this run was working"):
        compress_checkpoint(src, out, CONFIG, options=StreamOptions(progress=False))
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    monkeypatch.setattr(stream, "_assemble", real)
    (out / "theirs.txt").unlink()
    out.rmdir()
    done = compress_checkpoint(src, out, CONFIG, options=StreamOptions(progress=False, resume=True))
    assert done.layers_done_before == 3 and (out / "jointrank_manifest.json").is_file()


def test_output_modes_match_save_pretrained(tmp_path):
    import os
    import stat

    from transformers import AutoModelForCausalLM

    src = tiny("llama", tmp_path / "src")
    in_memory(src, tmp_path / "mem")
    compress_checkpoint(src, tmp_path / "stream", CONFIG, options=StreamOptions(progress=False))
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "plain")
    modes = {d: stat.S_IMODE(os.stat(tmp_path / d).st_mode) for d in ("mem", "stream", "plain")}
    assert modes["mem"] == modes["stream"] == modes["plain"], modes
