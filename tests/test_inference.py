"""Inference of compressed models: a joint group projects once per forward, with the same logits as projecting
per member; stale projections are never served; the plan's cost model says which units would be slower."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

from conftest import ARCHS, tiny_model
from jointrank import JointRankError, compress_, merge_
from jointrank.architectures import describe
from jointrank.modules import LowRankLinear, SharedBasis, shared_projection
from jointrank.plan import GroupRule, JointRankConfig, unit_cost
from jointrank.planning import make_plan
from jointrank.tables import plan_summary

JOINT = JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint"), "v": GroupRule("separate")},
                        ratio=0.5)
MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def compressed(arch: str):
    model = tiny_model(arch)
    compress_(model, JOINT, progress=False)
    return model


@contextlib.contextmanager
def counting_basis_matmuls(model):
    """Counts F.linear calls whose weight is a joint group's shared basis (the projection x Bᵀ)."""
    bases = {id(m.weight) for m in model.modules() if isinstance(m, SharedBasis)}
    real, calls = nn.functional.linear, {"n": 0}

    def linear(x, weight, bias=None):
        calls["n"] += id(weight) in bases
        return real(x, weight, bias)

    nn.functional.linear = linear
    try:
        yield calls
    finally:
        nn.functional.linear = real


def joint_groups(model) -> int:
    return sum(isinstance(m, SharedBasis) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", list(MODES))
def test_one_projection_per_group_and_same_logits_as_unshared(arch, mode, tokens):
    model = compressed(arch)
    groups = joint_groups(model)
    assert groups == 2 * model.config.num_hidden_layers
    with MODES[mode]():
        with counting_basis_matmuls(model) as calls:
            shared = model(tokens).logits
        assert calls["n"] == groups  # one per group, not one per member
        with shared_projection(False), counting_basis_matmuls(model) as calls:
            unshared = model(tokens).logits
        assert calls["n"] == 2 * groups  # the unfused path really projects per member
    assert torch.equal(shared, unshared)  # the very same matmuls: bit-identical
    merge_(model)  # dense weights A·B: the same function up to rounding
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, shared, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_generate_with_kv_cache_projects_once_per_group_and_step(arch, mode, tokens):
    model = compressed(arch)
    groups, new = joint_groups(model), 5
    kwargs = dict(attention_mask=torch.ones_like(tokens), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  use_cache=True, pad_token_id=0)
    with MODES[mode]():
        with counting_basis_matmuls(model) as calls:
            shared = model.generate(tokens, **kwargs)
        assert calls["n"] == groups * new  # prefill + 4 cached decode steps: one forward each
        with shared_projection(False):
            unshared = model.generate(tokens, **kwargs)
    assert torch.equal(shared, unshared)


def test_gradients_equal_with_and_without_sharing(tokens):
    model = compressed("llama")
    grads = []
    for enabled in (True, False):
        model.zero_grad()
        with shared_projection(enabled):
            model(tokens, labels=tokens).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    basis = next(m for m in model.modules() if isinstance(m, SharedBasis))
    assert basis.weight.grad.abs().sum() > 0  # the shared basis is trained through both members


def _attention(model):
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LowRankLinear) and attn.q_proj.shared_basis is attn.k_proj.shared_basis
    return attn


def _unshared(module, x):
    with shared_projection(False):
        return module(x)


@pytest.mark.parametrize("mode", ["no_grad", "grad"])
def test_input_modified_in_place_between_members_is_not_served_stale(mode):
    attn = _attention(compressed("llama"))
    with MODES[mode]():
        x = torch.randn(2, 5, 48)
        attn.q_proj(x)
        x.mul_(3)  # the version counter moves: k must see the new x
        assert torch.equal(attn.k_proj(x), _unshared(attn.k_proj, x))


def test_different_inputs_and_reloaded_basis_are_not_served_stale():
    attn = _attention(compressed("llama"))
    with torch.inference_mode():
        x, y = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
        attn.q_proj(x)
        assert torch.equal(attn.k_proj(y), _unshared(attn.k_proj, y))  # another tensor: recomputed
    with torch.no_grad():
        x = torch.randn(2, 5, 48)
        attn.q_proj(x)
        attn.q_proj.shared_basis.weight.mul_(0.5)  # e.g. load_state_dict between the calls
        assert torch.equal(attn.k_proj(x), _unshared(attn.k_proj, x))


def test_projection_is_reused_exactly_num_members_times_then_released():
    attn = _attention(compressed("llama"))
    basis = attn.q_proj.shared_basis
    with torch.no_grad(), counting_basis_matmuls(attn) as calls:
        x = torch.randn(1, 3, 48)
        attn.q_proj(x), attn.k_proj(x)
        assert calls["n"] == 1 and basis._cache is None  # nothing held after the group is done
        attn.q_proj(x), attn.q_proj(x), attn.k_proj(x)  # a member called twice: still correct, one extra
        assert calls["n"] == 3


# ------------------------------------------------------------------------------------------------ cost model


def test_unit_cost_counts_the_shared_projection_once():
    c = unit_cost((1024, 256), 640, 100)  # Gemma-3-270M q+k at rank 100
    assert c.dense_macs == (1024 + 256) * 640
    assert c.factorised_macs == 100 * 640 + 100 * (1024 + 256)
    assert c.factorised_params == c.factorised_macs  # one projection: multiply-adds per token = weights read
    unshared = unit_cost((1024, 256), 640, 100, shared_projection=False)
    assert unshared.factorised_macs == 2 * 100 * 640 + 100 * (1024 + 256)
    assert c.verdict() == "" and c.speedup == pytest.approx(c.dense_macs / c.factorised_macs)


def test_unit_cost_break_even():
    # separate rank-k on a 640 -> 256 matrix: faster iff k (640 + 256) < 640 * 256, i.e. k <= 182
    assert unit_cost((256,), 640, 182).verdict() == ""
    assert unit_cost((256,), 640, 183).verdict() == "slower and larger than dense"
    # a joint group whose projection is not shared is slower than its size says
    v = unit_cost((1024, 256), 640, 420, shared_projection=False)
    assert v.factorised_params < v.dense_params and v.verdict() == "slower than dense"
    assert unit_cost((256,), 640, 150).verdict(margin=0.2) == "less than 20% cheaper than dense"


def test_plan_reports_slow_units_and_keep_slow_keeps_them_dense():
    layout = describe(tiny_model("llama"))  # hidden 48: v (48x48) breaks even at k = 24, q+k (96x48) at 32
    rules = {"v": GroupRule("separate"), "qk": GroupRule("joint")}
    loose = make_plan(layout, JointRankConfig(rules=rules, rank=30, only_if_smaller=False))
    v = [e for e in loose.entries if e.group == "v"]
    assert all(e.structure == "separate" and "slower and larger than dense" in e.note for e in v)
    strict = make_plan(layout, JointRankConfig(rules=rules, rank=30, only_if_smaller=False, keep_slow=0.0))
    v = [e for e in strict.entries if e.group == "v"]
    assert all(e.structure == "keep" and e.params_after == e.params_before and "kept dense" in e.note for e in v)
    qk = [e for e in strict.entries if e.group == "qk"]  # 30 * (48 + 96) < 96 * 48: faster, still factorised
    assert all(e.structure == "joint" and e.note == "" for e in qk)
    # a margin keeps units that would save too little: qk saves 1 - 4320/4608 = 6%
    margin = make_plan(layout, JointRankConfig(rules=rules, rank=30, keep_slow=0.1))
    assert all(e.structure == "keep" for e in margin.entries)


def test_keep_slow_with_a_target_still_reaches_the_target():
    layout = describe(tiny_model("llama"))
    config = JointRankConfig(rules={"qk": GroupRule("joint"), "v": GroupRule("separate")}, target=0.05,
                             scope="decoder", keep_slow=0.3)
    plan = make_plan(layout, config)
    removed = plan.params_removed / plan.params_decoder_before
    assert removed >= 0.05
    assert all(unit_cost(e.d_outs, e.d_in, e.rank).speedup >= 1 / 0.7 for e in plan.factorised)


def test_keep_slow_margin_is_validated():
    layout = describe(tiny_model("llama"))
    with pytest.raises(JointRankError, match="keep-slow"):
        make_plan(layout, JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.5, keep_slow=1.0))


def test_plan_table_shows_modelled_cost():
    layout = describe(tiny_model("llama"))
    plan = make_plan(layout, JointRankConfig(rules={"qk": GroupRule("joint")}, rank=30))
    text = plan_summary([vars(e) for e in plan.entries if e.structure != "keep"])
    e = plan.factorised[0]
    cost = unit_cost(e.d_outs, e.d_in, e.rank)
    assert "MACs/token vs dense" in text and f"{cost.factorised_macs / cost.dense_macs:.2f}x" in text


def _column_major(module: LowRankLinear) -> bool:
    w = module.out.weight
    return w.stride() == (1, w.shape[0])


def test_output_factors_are_column_major_in_float32_and_bfloat16_on_cpu_with_the_same_logits_and_saved_bytes(
        tokens, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import jointrank

    model = tiny_model("llama")
    result = compress_(model, JOINT, progress=False)
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert low_rank and all(_column_major(m) for m in low_rank)  # compressed in float32 on a CPU
    with torch.no_grad():
        column = model(tokens).logits
        LowRankLinear.column_major = False
        try:
            jointrank.modules.relayout_(model)
            assert not any(_column_major(m) for m in low_rank)
            row = model(tokens).logits
            row_dir = jointrank.save(model, None, tmp_path / "row", result, source="tiny")
        finally:
            LowRankLinear.column_major = True
        jointrank.modules.relayout_(model)
        torch.testing.assert_close(column, row, rtol=1e-5, atol=1e-5)  # same values, another summation order
        out = jointrank.save(model, None, tmp_path / "column", result, source="tiny")
        saved, saved_row = load_file(str(out / "model.safetensors")), load_file(str(row_dir / "model.safetensors"))
        assert saved.keys() == saved_row.keys() and all(torch.equal(saved[k], saved_row[k]) for k in saved)
        # transformers assigns the stored (row-major) tensors when loading: the load hook lays them out again
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert all(_column_major(m) for m in reloaded.modules() if isinstance(m, LowRankLinear))
        torch.testing.assert_close(reloaded(tokens).logits, column, rtol=0, atol=0)
        # .to() lays every factor out again: bfloat16 column-major too, float16 (not measured) row-major
        model.to(torch.bfloat16)
        assert all(_column_major(m) for m in low_rank)
        model.to(torch.float16)
        assert not any(_column_major(m) for m in low_rank)
        model.to(torch.float32)  # (transformers refuses .float() on a model with a quantization_config)
        assert all(_column_major(m) for m in low_rank)
