"""What a MODEL argument names, decided before any weights load; hub ids stay hub ids."""

import pytest

from jointrank import JointRankError
from jointrank.sources import MANIFEST_NAME, load_model, resolve


def test_kinds_of_model_argument(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "jr").mkdir()
    (tmp_path / "jr" / "config.json").write_text("{}")
    (tmp_path / "jr" / MANIFEST_NAME).write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "hf")).kind == "hf_dir"
    assert resolve(str(tmp_path / "jr")).kind == "jointrank_dir"
    assert resolve(str(tmp_path / "m.gguf")).kind == "gguf"
    assert resolve(str(tmp_path / "g")).path == str(tmp_path / "g" / "x.gguf")
    assert resolve("google/gemma-3-270m").kind == "hub"  # online users' hub ids keep working
    assert resolve("meta-llama/Llama-2-7b-hf").path == "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize("spec,message", [
    ("./not/here", "model not found"),
    ("/abs/missing", "model not found"),
    ("nonsense", "model not found"),
])
def test_missing_models_are_named(spec, message):
    with pytest.raises(JointRankError, match=message):
        resolve(spec)


def test_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04")  # a pickle is never opened
    with pytest.raises(JointRankError, match="not a .gguf model"):
        resolve(str(tmp_path / "weights.bin"))


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(JointRankError, match="could not load no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")
