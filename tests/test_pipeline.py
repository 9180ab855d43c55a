"""The library entry point (issue #13): `jointrank.compress_model` does what `jointrank compress` does, and the
CLI is a thin layer over it; `save` builds the manifest itself, so a checkpoint saved from Python is one
`jointrank info` reads."""

import json

import pytest
from conftest import tiny_model

import jointrank
from jointrank import GroupRule, JointRankConfig, JointRankError
from jointrank.cli import main
from jointrank.pipeline import Calibration, compress_model
from jointrank.stream import StreamOptions

CONFIG = JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint")}, ratio=0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    return path


def weights(path):
    return (path / "model.safetensors").read_bytes()


def test_the_library_call_writes_what_the_command_writes(model_dir, tmp_path, capsys):
    run = compress_model(str(model_dir), tmp_path / "lib", CONFIG)
    assert run.out == tmp_path / "lib" and run.result.params_total_after < run.result.params_total_before
    assert main(["compress", str(model_dir), "--out", str(tmp_path / "cli"), "--qk", "joint", "--gate-up", "joint",
                 "--ratio", "0.5"]) == 0
    assert weights(tmp_path / "lib") == weights(tmp_path / "cli")
    lib, cli = (json.loads((tmp_path / d / "jointrank_manifest.json").read_text()) for d in ("lib", "cli"))
    assert lib["plan"] == cli["plan"] and lib["config"] == {**cli["config"], "preset": None}
    capsys.readouterr()
    assert main(["info", str(tmp_path / "lib")]) == 0
    assert str(model_dir) in capsys.readouterr().out


def test_a_checkpoint_saved_from_python_is_one_info_reads(tmp_path, capsys):
    model = tiny_model("qwen2")
    result = jointrank.compress_(model, CONFIG, progress=False)
    out = jointrank.save(model, None, tmp_path / "ck", result, source="my-model")
    assert main(["info", str(out), "--verify"]) == 0  # --verify: every tensor's bytes against the manifest's sha256
    printed = capsys.readouterr().out
    assert "factorised checkpoint of my-model" in printed and "checksums: " in printed
    assert jointrank.read_manifest(out)["config"] == CONFIG.to_dict()  # the plan's config, when none is given
    with pytest.raises(JointRankError, match="save builds the manifest itself"):
        jointrank.save(model, None, tmp_path / "raw", {"source": "my-model"})
    assert not (tmp_path / "raw").exists()


def test_streaming_through_the_library_and_what_it_refuses(model_dir, tmp_path):
    run = compress_model(str(model_dir), tmp_path / "streamed", CONFIG, stream=StreamOptions(progress=False))
    assert run.result.params_decoder_after < run.result.params_decoder_before
    assert (tmp_path / "streamed" / "jointrank_manifest.json").is_file()
    with pytest.raises(JointRankError, match="--heal and --calibration|--calibration and --heal"):
        compress_model(str(model_dir), tmp_path / "x", CONFIG, stream=StreamOptions(progress=False),
                       calibration=Calibration("self"), heal="refit")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model fails the test: what is refused must be refused before it."""
    import jointrank.sources

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(jointrank.sources, "load_model", load_model)


def test_requests_that_do_not_fit_the_method_are_refused_before_loading(model_dir, tmp_path, no_loading):
    with pytest.raises(JointRankError, match="is data-free and takes no --calibration"):
        compress_model(str(model_dir), tmp_path / "o", CONFIG, calibration=Calibration("self"))
    with pytest.raises(JointRankError, match="needs calibration text"):
        compress_model(str(model_dir), tmp_path / "o", JointRankConfig(rules=CONFIG.rules, ratio=0.5,
                                                                        method="svd_llm"))
    assert not (tmp_path / "o").exists()


def test_a_python_caller_gets_the_commands_input_checks_before_loading(model_dir, tmp_path, no_loading):
    svd_llm = JointRankConfig(rules=CONFIG.rules, ratio=0.5, method="svd_llm")
    binary = tmp_path / "calibration.bin"
    binary.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(JointRankError, match="is not UTF-8 text|NUL bytes"):
        compress_model(str(model_dir), tmp_path / "o", svd_llm, calibration=Calibration(str(binary)))
    with pytest.raises(JointRankError, match="--device nope: not a device name"):
        compress_model(str(model_dir), tmp_path / "o", CONFIG, device="nope")
    with pytest.raises(JointRankError, match="--device nope: not a device name"):  # streaming: its own device
        compress_model(str(model_dir), tmp_path / "o", CONFIG, stream=StreamOptions(device="nope"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(JointRankError, match="already exists"):
        compress_model(str(model_dir), tmp_path / "taken", CONFIG)
    assert not (tmp_path / "o").exists()


def test_a_dense_export_through_the_library_is_one_info_reads_as_dense(model_dir, tmp_path, capsys):
    run = compress_model(str(model_dir), tmp_path / "dense", CONFIG, dense=True)
    assert jointrank.read_manifest(run.out)["format_kind"] == "dense"
    assert main(["info", str(run.out)]) == 0
    assert "dense checkpoint of" in capsys.readouterr().out


def test_how_many_calibration_tokens_a_request_stands_for():
    from jointrank.methods.calibration import DEFAULT_TOKENS
    from jointrank.methods.selfgen import DEFAULT_SELF_TOKENS

    assert jointrank.Calibration("self:64").token_count() == 64
    assert jointrank.Calibration("self").token_count() == DEFAULT_SELF_TOKENS
    assert jointrank.Calibration("text.txt").token_count() == DEFAULT_TOKENS
    assert jointrank.Calibration("text.txt", 100).token_count() == 100  # an explicit count wins
    assert jointrank.Calibration("self", 100).token_count() == 100


def test_an_interrupted_streaming_command_says_how_to_resume(model_dir, tmp_path, monkeypatch, capsys):
    import jointrank.streaming as streaming

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "compress_checkpoint", interrupted)
    assert main(["compress", str(model_dir), "--qk", "joint", "--ratio", "0.5", "--stream",
                 "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert f"finished layers are kept in {tmp_path / '.o'}.partial; rerun with --resume" in err


@pytest.mark.parametrize("command", ["compress", "plan"])
def test_with_two_mistakes_the_calibration_one_is_reported_first(model_dir, tmp_path, capsys, command):
    """The check order the command always had: calibration against the method, then the healing settings."""
    args = [command, str(model_dir), "--qk", "joint", "--ratio", "0.5", "--heal", "distill", "--heal-steps", "0"]
    args += ["--out", str(tmp_path / "o")] if command == "compress" else ["--no-estimate"]
    assert main(args) == 1
    assert "--heal distill needs calibration text" in capsys.readouterr().err
    assert main(args + ["--calibration", "self"]) == 1
    assert "--heal-steps must be positive" in capsys.readouterr().err


def test_compress_model_progress_false_prints_no_bars(tmp_path, capfd):
    # a library caller (a notebook, a service) asks for silence: no tqdm bar on stderr, same checkpoint
    from jointrank import GroupRule, JointRankConfig, compress_model
    from tiny_models import save_tiny

    source = save_tiny("llama", tmp_path / "src")
    config = JointRankConfig(rules={"qk": GroupRule("joint"), "down": GroupRule("separate")}, ratio=0.5)
    capfd.readouterr()
    compress_model(str(source), tmp_path / "quiet", config, progress=False)
    assert "factorising" not in capfd.readouterr().err
    compress_model(str(source), tmp_path / "loud", config)
    assert "factorising" in capfd.readouterr().err
