"""Quantisation-aware healing (quantize.fake_quantize_, DistillSettings.quantized_steps, --heal-quantized-steps).

What must hold: a fake-quantised model computes what quantize_ will store, before and after training (the grids are
fixed and reused); the rounding passes the gradient straight through; healing through the rounding leaves the
*stored* model closer to the teacher than spending the same steps in float and rounding afterwards; a rerun resumes
both phases to the same factors; the CLI records it, turns it on by default with --quantize and refuses it where
it cannot run, in one line.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model

import jointrank
from jointrank import GroupRule, JointRankConfig, JointRankError
from jointrank.cli import main
from jointrank.heal import QUANTIZED_STEPS, DistillSettings, distill_, heal_, teacher_states
from jointrank.methods.calibration import Calibration
from jointrank.quantize import FakeQuantized, fake_quantize_, is_quantized, quantize_, spec_for

pytest.importorskip("optimum.quanto", reason="needs the quant extra: pip install 'jointrank[quant]'")

RULES = {"qk": GroupRule("joint"), "gate_up": GroupRule("joint"), "v": GroupRule("separate"),
         "o": GroupRule("separate"), "down": GroupRule("separate")}
SHAPE = dict(hidden_size=64, intermediate_size=128)  # int4 groups fit: 64 and 32 wide


def ids(n=8, seqlen=24, seed=3):
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def dense_and_compressed(arch="llama"):
    dense = tiny_model(arch, **SHAPE)
    model = copy.deepcopy(dense)
    jointrank.compress_(model, JointRankConfig(rules=RULES, ratio=0.5), progress=False)
    return dense, model


def kl_on(student, teacher, tokens) -> float:
    with torch.no_grad():
        s = torch.log_softmax(student(tokens).logits.float(), -1)
        t = torch.log_softmax(teacher(tokens).logits.float(), -1)
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum")) / tokens.numel()


def calibration(tokens):
    return Calibration(tokens, "test", 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-g32"])
def test_the_fake_quantised_model_computes_what_quantize_stores_before_and_after_training(arch, scheme):
    dense, model = dense_and_compressed(arch)
    tokens = ids()
    plain = copy.deepcopy(model)
    quantize_(plain, scheme)
    fake_quantize_(model, scheme)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, plain(tokens).logits, rtol=1e-5, atol=1e-5)
    distill_(model, teacher_states(dense, tokens, progress=False), tokens, DistillSettings(steps=6, lr=1e-2),
             progress=False)
    with torch.no_grad():
        trained = model(tokens).logits
    quantize_(model, scheme)  # on the grids training saw, so the stored model is the trained one
    assert is_quantized(model) and not hasattr(model, "_jointrank_fake_scheme")
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        stored = model(tokens).logits
    torch.testing.assert_close(stored, trained, rtol=1e-5, atol=1e-5)
    assert (stored - plain(tokens).logits).abs().max() > 1e-3  # and training did change it


def test_rounding_passes_the_gradient_straight_through():
    torch.manual_seed(0)
    weight = torch.randn(16, 64, requires_grad=True)
    spec = spec_for("int4", 16, 64)
    from jointrank.quantize import fit_grid

    fake = FakeQuantized(spec, *fit_grid(weight.detach(), spec))
    out = fake(weight)
    assert not torch.equal(out, weight)  # rounded ...
    upstream = torch.randn(16, 64)
    (out * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)  # ... and differentiated as the identity


def test_healing_through_the_rounding_beats_rounding_after_float_healing():
    # the same number of distillation steps: all in float then quantised, or the last ones through the rounding.
    # Judged on the calibration windows, the loss both runs train on: a tiny random model does not generalise from
    # 8 windows (results/quantize.md measures held-out text on a real model)
    dense, model = dense_and_compressed()
    tokens = ids(n=8, seqlen=32)
    steps = 30
    after = copy.deepcopy(model)
    heal_(after, teacher_states(dense, tokens, progress=False), calibration(tokens), "distill",
          DistillSettings(steps=2 * steps, lr=3e-3), progress=False)
    quantize_(after, "int4")
    aware = model
    report = heal_(aware, dense, calibration(tokens), "distill",
                   DistillSettings(steps=steps, lr=3e-3, quantized_steps=steps), progress=False, quantize="int4")
    quantize_(aware, "int4")
    assert report["distill_quantized"]["scheme"] == "int4" and report["distill_quantized"]["steps_done"] == steps
    assert sum(b.numel() for b in aware.buffers()) == sum(b.numel() for b in after.buffers())  # same storage
    assert kl_on(aware, dense, tokens) < 0.7 * kl_on(after, dense, tokens)


def test_a_rerun_resumes_both_phases_to_the_same_factors(tmp_path):
    dense, model = dense_and_compressed()
    tokens = ids()
    twin = copy.deepcopy(model)
    settings = DistillSettings(steps=4, lr=1e-2, quantized_steps=3)
    first = heal_(model, dense, calibration(tokens), "distill", settings, state_dir=tmp_path, progress=False,
                  quantize="int8")
    assert (tmp_path / "quantized").is_dir()  # the second phase keeps its own state
    again = heal_(twin, dense, calibration(tokens), "distill", settings, state_dir=tmp_path, progress=False,
                  quantize="int8")
    assert again["distill"]["resumed_from"] == 4 and again["distill_quantized"]["resumed_from"] == 3
    assert again["distill_quantized"]["losses"] == first["distill_quantized"]["losses"]
    quantize_(model, "int8")
    quantize_(twin, "int8")
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, twin(tokens).logits)


def test_a_model_healed_for_one_scheme_is_not_stored_with_another():
    _, model = dense_and_compressed()
    fake_quantize_(model, "int4")
    with pytest.raises(JointRankError, match="healed for int4"):
        quantize_(model, "int8")
    with pytest.raises(JointRankError, match="already quantised"):
        fake_quantize_(model, "int4")


def test_cli_heals_for_the_quantisation_by_default_and_records_it(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JOINTRANK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    code = main(["compress", str(model_dir), "--qk", "joint", "--ratio", "0.5", "--calibration", "self:96",
                 "--heal", "distill", "--heal-steps", "2", "--quantize", "int8", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    heal = json.loads((out / "jointrank_manifest.json").read_text())["result"]["extra"]["heal"]
    assert heal["distill_quantized"]["scheme"] == "int8"
    assert heal["distill_quantized"]["steps_done"] == QUANTIZED_STEPS  # the default with --quantize
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert is_quantized(reloaded)


@pytest.mark.parametrize("extra,message", [
    (["--heal", "distill", "--calibration", "self:64", "--heal-quantized-steps", "4"], "it needs --quantize"),
    (["--quantize", "int8", "--heal-quantized-steps", "4"], "it needs --quantize SCHEME and --heal distill"),
    (["--quantize", "int8", "--heal", "refit", "--calibration", "self:64", "--heal-quantized-steps", "4"],
     "and --heal distill"),
    (["--quantize", "int8", "--heal", "distill", "--calibration", "self:64", "--heal-quantized-steps", "-1"],
     "--heal-quantized-steps must be 0 or more"),
])
def test_cli_refuses_quantised_healing_where_it_cannot_run(model_dir, tmp_path, capsys, extra, message):
    code = main(["compress", str(model_dir), "--qk", "joint", "--ratio", "0.5", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "o").exists()
