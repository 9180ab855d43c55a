"""Compressing real transformers models: full-rank exactness, biases, sizes, format names, dense export.
(Every family x method x path through the same checks: tests/test_table.py.)"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open

import jointrank
from jointrank import GroupRule, JointRankConfig, JointRankError
from jointrank.architectures import count_parameters, describe
from jointrank.modules import LowRankLinear

ALL_GROUPS = {"qk": GroupRule("joint"), "gate_up": GroupRule("joint"), "v": GroupRule("separate"),
              "o": GroupRule("separate"), "down": GroupRule("separate")}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_full_rank_joint_reproduces_the_original_logits(arch, tokens):
    model = tiny_model(arch)
    before = logits(model, tokens)
    config = JointRankConfig(rules=ALL_GROUPS, ratio=1.0, only_if_smaller=False)
    result = jointrank.compress_(model, config, progress=False)
    assert len(result.units) == 3 * 5  # every group of every layer was factorised
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    # float32 SVD round-off through 3 layers; tolerance far below any rank-truncation effect
    assert torch.allclose(logits(model, tokens), before, atol=2e-4, rtol=1e-4)


def test_biases_are_kept_exactly():
    model = tiny_model("qwen2")
    original = model.model.layers[1].self_attn.k_proj.bias.detach().clone()
    jointrank.compress_(model, JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.3), progress=False)
    assert torch.equal(model.model.layers[1].self_attn.k_proj.bias, original)


def test_lower_rank_never_beats_higher_rank_on_reconstruction():
    errors = []
    for ratio in (0.2, 0.5, 0.8):
        model = tiny_model("llama")
        result = jointrank.compress_(model, JointRankConfig(rules={"gate_up": GroupRule("joint")}, ratio=ratio,
                                                            only_if_smaller=False), progress=False)
        errors.append(max(u.rel_error for u in result.units))
    assert errors[0] > errors[1] > errors[2]


def test_checkpoint_stores_factors_under_the_format_names(tmp_path):
    """The tensor names the format promises. (Parameter counts, round trip through from_pretrained and generation
    for every family and method: tests/test_table.py.)"""
    model = tiny_model("llama")
    result = jointrank.compress_(model, JointRankConfig(rules=ALL_GROUPS, ratio=0.5), progress=False)
    out = jointrank.save(model, None, tmp_path / "ck", result, source="tiny")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.self_attn.qk_basis.weight", "model.layers.0.self_attn.q_proj.out.weight",
            "model.layers.0.mlp.down_proj.basis.weight", "model.layers.0.mlp.down_proj.out.weight"} <= keys


def test_saved_file_is_smaller_by_the_parameter_reduction(tmp_path):
    dense, small = tiny_model("llama"), tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    dense_dir = tmp_path / "dense"
    result = jointrank.compress_(small, JointRankConfig(rules=ALL_GROUPS, ratio=0.25), progress=False)
    small_dir = jointrank.save(small, None, tmp_path / "small", result, source="tiny")
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    ratio = result.params_total_after / result.params_total_before
    assert size(small_dir) / size(dense_dir) == pytest.approx(ratio, abs=0.01)


def test_dense_export_loads_in_plain_transformers(tokens, tmp_path):
    model = tiny_model("mistral")
    result = jointrank.compress_(model, JointRankConfig(rules=ALL_GROUPS, ratio=0.4), progress=False)
    expected = logits(model, tokens)
    merged = jointrank.merge_(model)
    assert merged == 3 * 7 and count_parameters(model) == count_parameters(tiny_model("mistral"))
    assert torch.allclose(logits(model, tokens), expected, atol=1e-5)
    out = jointrank.save(model, None, tmp_path / "dense", result, source="tiny")
    assert json.loads((out / "jointrank_manifest.json").read_text())["format_kind"] == "dense"  # merged: said so
    torch.save(tokens, tmp_path / "tokens.pt")
    torch.save(expected, tmp_path / "expected.pt")
    # a fresh interpreter that never imports jointrank: the export must be an ordinary checkpoint
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
assert 'jointrank' not in sys.modules
t = torch.load({str(tmp_path / 'tokens.pt')!r}); e = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    print(float((m(t).logits - e).abs().max()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(JointRankError, match=r"unsupported architecture 'gpt2'.*c_attn.*supported: .*llama"):
        describe(model)


def test_a_plan_for_another_model_is_refused():
    small = tiny_model("llama")
    plan = jointrank.plan_for(small, JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.5))
    other = tiny_model("mistral")  # fewer K rows under GQA
    with pytest.raises(JointRankError, match="does not fit"):
        jointrank.compress_(other, plan, progress=False)


def test_shared_projection_is_computed_once_per_forward(tokens):
    model = tiny_model("llama")
    jointrank.compress_(model, JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint")},
                                               ratio=0.5), progress=False)
    calls = []
    original = torch.nn.functional.linear

    def counting(x, w, b=None):
        calls.append(w.shape)
        return original(x, w, b)

    basis = model.model.layers[0].self_attn.qk_basis.weight
    torch.nn.functional.linear = counting
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        torch.nn.functional.linear = original
    assert sum(1 for s in calls if s == basis.shape) == 3 * 2  # qk and gate_up: once per group per layer


def test_a_reloaded_checkpoint_fine_tunes_with_the_transformers_trainer(tmp_path):
    """A jointrank checkpoint is flagged as quantised (so that loading rebuilds its modules); the Trainer refuses a
    "purely quantized" model unless its quantizer says it trains. Two real steps: every factor moves, loss finite."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = tiny_model("llama")
    result = jointrank.compress_(model, JointRankConfig(rules=ALL_GROUPS, ratio=0.5), progress=False)
    out = jointrank.save(model, None, tmp_path / "ck", result, source="tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.is_quantized  # what made the Trainer refuse it
    before = {n: p.detach().clone() for n, p in reloaded.named_parameters() if ".out." in n or "basis" in n}
    ids = torch.randint(0, reloaded.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "train"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=reloaded, args=args, train_dataset=data)
    losses = trainer.train()
    assert torch.isfinite(torch.tensor(losses.training_loss))
    after = dict(reloaded.named_parameters())
    assert before and all(not torch.equal(after[n].detach(), w) for n, w in before.items())
