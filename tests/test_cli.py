"""The command line: every kind of bad input gives one clear error, a non-zero exit, and writes nothing."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

import jointrank
from jointrank.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-mistral"
    tiny_model("mistral").save_pretrained(path)
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "0"], "ratio must be in (0, 1]"),
    (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["--rank", "1000"], "--rank 1000 exceeds min(d_out, d_in) = 48"),
    (["--ratio", "0.5", "--layers", "middle:2"], "unknown layer spec 'middle:2'"),
    (["--ratio", "0.5", "--gate-up", "joint@0-7"], "0-7 is outside layers 0-2"),
    (["--ratio", "0.5", "--v", "joint"], "v has one member, so it cannot be joint"),
    (["--target", "0.9"], "cannot remove 90.0%"),
    # the tiny model is saved without a tokenizer: nothing to sample or read text with
    (["--ratio", "0.5", "--method", "svd_llm", "--calibration", "self:64"], "needs the model's tokenizer"),
])
def test_bad_compression_requests(model_dir, tmp_path, capsys, extra, message):
    args = ["compress", model_dir, "--out", tmp_path / "out", "--qk", "joint"] + extra
    code, _, err = run(args, capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]  # progress bars of the model load may come before it
    assert last.startswith("jointrank: error:") and message in last and "Traceback" not in err
    assert leftovers(tmp_path) == []  # nothing written, not even a staging directory


def test_missing_model_and_non_model_directory(tmp_path, capsys):
    code, _, err = run(["compress", tmp_path / "nope", "--preset", "paper-10", "--out", tmp_path / "o"], capsys)
    assert code == 1 and "model not found" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(["compress", tmp_path / "empty", "--preset", "paper-10", "--out", tmp_path / "o"], capsys)
    assert code == 1 and "is a directory but not a model" in err
    assert leftovers(tmp_path) == ["empty"]


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    code, _, err = run(["compress", tmp_path / "gpt2", "--preset", "paper-10", "--out", tmp_path / "o"], capsys)
    assert code == 1 and "unsupported architecture 'gpt2'" in err and "c_attn (Conv1D)" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_unless_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run(["compress", model_dir, "--qk", "joint", "--ratio", "0.5", "--out", out], capsys)
    assert code == 1 and "already exists; pass --overwrite" in err
    assert leftovers(out) == ["precious.txt"]
    code, _, _ = run(["compress", model_dir, "--qk", "joint", "--ratio", "0.5", "--out", out, "--overwrite"],
                     capsys)
    assert code == 0 and "precious.txt" not in leftovers(out) and leftovers(tmp_path) == ["out"]


def test_compress_then_info_reports_what_the_files_hold(model_dir, tmp_path, capsys):
    out = tmp_path / "small"
    code, stdout, _ = run(["compress", model_dir, "--qk", "joint", "--gate-up", "joint@last:2", "--target", "0.1",
                           "--scope", "decoder", "--out", out], capsys)
    assert code == 0 and "decoder layers" in stdout
    manifest = json.loads((out / "jointrank_manifest.json").read_text())
    params = manifest["result"]["params"]
    model = jointrank.load(out)
    assert jointrank.architectures.count_parameters(model) == params["total_after"]
    removed = 1 - params["decoder_after"] / params["decoder_before"]
    assert 0.10 <= removed < 0.11
    code, stdout, _ = run(["info", out, "--layers"], capsys)
    assert code == 0 and "qk_proj" not in stdout and "q_proj+k_proj" in stdout and "gate_proj+up_proj" in stdout
    code, stdout, err = run(["info", model_dir], capsys)
    assert code == 1 and "not a jointrank checkpoint" in err


def test_interrupted_save_leaves_nothing_that_looks_finished(model_dir, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    code, _, err = run(["compress", model_dir, "--qk", "joint", "--ratio", "0.5", "--out", tmp_path / "o"], capsys)
    assert code == 130 and "nothing was written" in err
    assert leftovers(tmp_path) == []


def test_dense_flag_writes_an_original_shape_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "dense"
    code, _, _ = run(["compress", model_dir, "--qk", "joint", "--ratio", "0.5", "--dense", "--out", out], capsys)
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(dense.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert torch.linalg.matrix_rank(dense.model.layers[0].self_attn.q_proj.weight) == 24  # 0.5 * min(48, 48)


@pytest.mark.parametrize("module", ["jointrank.cli", "jointrank"])  # python -m jointrank: the same command line
def test_entry_point_exits_non_zero_on_bad_input(tmp_path, module):
    done = subprocess.run([sys.executable, "-m", module, "compress", str(tmp_path / "x"), "--ratio", "2",
                           "--qk", "joint", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 1 and "ratio must be in (0, 1]" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_choices_come_from_the_registries():
    """A preset, solver or allocation added to its registry is accepted by the CLI without editing cli.py."""
    import argparse

    from jointrank.cli import _add_plan_arguments
    from jointrank.linalg import SOLVERS
    from jointrank.plan import ALLOCATIONS, PRESETS

    parser = argparse.ArgumentParser()
    _add_plan_arguments(parser)
    choices = {a.dest: a.choices for a in parser._actions if a.choices is not None}
    assert sorted(choices["preset"]) == sorted(PRESETS)
    assert tuple(choices["solver"]) == tuple(SOLVERS)
    assert tuple(choices["allocation"]) == tuple(ALLOCATIONS)
