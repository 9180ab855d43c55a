"""Plans are values computed from shapes: layer specs, rank rules, presets, targets, and their errors."""

import pytest

from jointrank import JointRankError
from jointrank.architectures import GroupLayout, Member, ModelLayout
from jointrank.plan import PRESETS, CompressionPlan, GroupRule, JointRankConfig, parse_layers
from jointrank.planning import make_plan


def llama7b_layout(num_layers=32, d=4096, ffn=11008, kv=4096):
    groups = []
    for i in range(num_layers):
        p = f"model.layers.{i}"
        attn = [("q_proj", d, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, d)]
        mems = {n: Member(f"{p}.self_attn.{n}", o, ii, False) for n, o, ii in attn}
        mems.update({n: Member(f"{p}.mlp.{n}", o, ii, False)
                     for n, o, ii in [("gate_proj", ffn, d), ("up_proj", ffn, d), ("down_proj", d, ffn)]})
        groups += [
            GroupLayout(i, "qk", f"{p}.self_attn", (mems["q_proj"], mems["k_proj"])),
            GroupLayout(i, "v", f"{p}.self_attn", (mems["v_proj"],)),
            GroupLayout(i, "o", f"{p}.self_attn", (mems["o_proj"],)),
            GroupLayout(i, "gate_up", f"{p}.mlp", (mems["gate_proj"], mems["up_proj"])),
            GroupLayout(i, "down", f"{p}.mlp", (mems["down_proj"],)),
        ]
    decoder = num_layers * (4 * d * d + 3 * d * ffn)  # (norms left out: not needed for the arithmetic)
    return ModelLayout("llama", num_layers, tuple(groups), decoder + 2 * 32000 * d, decoder)


@pytest.mark.parametrize("spec,expected", [
    ("all", list(range(8))), ("first:2", [0, 1]), ("last:3", [5, 6, 7]), ("last:22/32", [2, 3, 4, 5, 6, 7]),
    ("0-2,5", [0, 1, 2, 5]), ("3", [3]), ("1-2,2-3", [1, 2, 3]),
])
def test_layer_specs(spec, expected):
    assert parse_layers(spec, 8) == expected


@pytest.mark.parametrize("spec", ["last", "middle:3", "0-9", "5-2", "last:9", "last:5/4", ""])
def test_bad_layer_specs_are_refused(spec):
    with pytest.raises(JointRankError, match="layer spec"):
        parse_layers(spec, 8)


def test_paper_20_structure_on_llama_7b_shapes():
    layout = llama7b_layout()
    plan = make_plan(layout, PRESETS["paper-20"])
    qk = [e for e in plan.entries if e.group == "qk"]
    gate_up = [e for e in plan.factorised if e.group == "gate_up"]
    assert {e.structure for e in qk} == {"separate"} and len(qk) == 64  # Q and K of every layer, each alone
    assert sorted(e.layer for e in gate_up) == list(range(10, 32))  # joint on the last 22 of 32
    assert {e.structure for e in gate_up} == {"joint"}
    assert {e.group for e in plan.factorised} == {"qk", "gate_up"}
    reduction = plan.params_removed / layout.params_total
    assert 0.20 <= reduction < 0.205


def test_target_lands_at_or_just_above_the_target_in_either_scope():
    layout = llama7b_layout()
    for scope, total in (("model", layout.params_total), ("decoder", layout.params_decoder)):
        for target in (0.05, 0.1, 0.15):
            config = JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint")},
                                     target=target, scope=scope)
            plan = make_plan(layout, config)
            got = plan.params_removed / total
            assert target <= got < target + 0.005, (scope, target, got)


def test_every_entry_counts_equation_9():
    plan = make_plan(llama7b_layout(4), JointRankConfig(rules={"qk": GroupRule("joint")}, rank=100))
    for e in plan.factorised:
        assert e.params_after == 100 * (sum(e.d_outs) + e.d_in)
        assert e.params_before == sum(e.d_outs) * e.d_in
    assert plan.params_total_after == plan.params_total_before - sum(e.params_before - e.params_after
                                                                     for e in plan.factorised)


def test_ratio_is_per_unit_of_its_smallest_side():
    layout = llama7b_layout(2, d=64, ffn=160, kv=16)
    plan = make_plan(layout, JointRankConfig(rules={"qk": GroupRule("separate")}, ratio=0.25))
    ranks = {e.members[0].rsplit(".", 1)[1]: e.rank for e in plan.factorised}
    assert ranks == {"q_proj": 16, "k_proj": 4}  # 0.25 * min(64, 64) and 0.25 * min(16, 64)


def test_units_that_would_grow_are_kept_and_explained():
    layout = llama7b_layout(2, d=64, ffn=160, kv=64)
    plan = make_plan(layout, JointRankConfig(rules={"qk": GroupRule("separate")}, ratio=0.9))
    qk = [e for e in plan.entries if e.group == "qk"]
    assert all(e.structure == "keep" and "would not reduce" in e.note for e in qk)
    forced = make_plan(layout, JointRankConfig(rules={"qk": GroupRule("separate")}, ratio=0.9,
                                               only_if_smaller=False))
    assert all(e.structure == "separate" for e in forced.entries if e.group == "qk")


def test_unreachable_target_is_an_error():
    with pytest.raises(JointRankError, match="cannot remove 60.0%"):
        make_plan(llama7b_layout(), JointRankConfig(rules={"qk": GroupRule("separate")}, target=0.6))


@pytest.mark.parametrize("config,message", [
    (JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.0), "ratio must be in"),
    (JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=1.5), "ratio must be in"),
    (JointRankConfig(rules={"qk": GroupRule("joint")}, rank=5000), "exceeds min"),
    (JointRankConfig(rules={"qk": GroupRule("joint")}), "exactly one rank rule"),
    (JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.5, rank=3), "exactly one rank rule"),
    (JointRankConfig(rules={"v": GroupRule("joint")}, ratio=0.5), "cannot be joint"),
    (JointRankConfig(rules={"qkv": GroupRule("joint")}, ratio=0.5), "unknown group"),
    (JointRankConfig(rules={"qk": GroupRule("squash")}, ratio=0.5), "unknown structure"),
    (JointRankConfig(rules={"qk": GroupRule("keep")}, ratio=0.5), "nothing to compress"),
    (JointRankConfig(rules={"qk": GroupRule("joint")}, target=1.2), "target"),
])
def test_bad_configs_are_refused(config, message):
    with pytest.raises(JointRankError, match=message):
        make_plan(llama7b_layout(2), config)


def test_plan_and_config_round_trip_through_dicts():
    config = PRESETS["paper-20"]
    assert JointRankConfig.from_dict(config.to_dict()) == config
    plan = make_plan(llama7b_layout(4), config)
    assert CompressionPlan.from_dict(plan.to_dict()) == plan


def test_config_from_a_global_allocation_plan_reads_back():
    """streaming.run._finish rebuilds the config from plan.config; the prior is a setting and survives the round trip,
    and a config stored before the prior was a setting reads back with the default."""
    cfg = JointRankConfig(rules={"qk": GroupRule("separate")}, target=0.1, allocation="global",
                          allocation_prior="depth")
    assert JointRankConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "allocation_prior"}
    assert JointRankConfig.from_dict(old).allocation_prior == "flat"
