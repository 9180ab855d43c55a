"""Cross-layer shared bases (JointRankConfig.share_layers): what a unit spanning layers promises.

The table (tests/test_table.py) runs every architecture x method x path with bases shared by 2 layers; here: which
units merge, that the stacked factorisation is the optimum of the stacked matrix, that the parameters are stored
once, that each layer projects its own input once, that calibration statistics are pooled over the layers, that
healing and global allocation (in memory and streamed) handle such units, and the refusals.
"""

import pytest
import torch
from conftest import tiny_model

import jointrank
from jointrank import GroupRule, JointRankConfig
from jointrank.architectures import count_parameters
from jointrank.cli import main
from jointrank.modules import SharedBasis
from jointrank.plan import span_of
from jointrank.planning import make_plan
from test_plan import llama7b_layout

ALL = {"qk": GroupRule("separate"), "v": GroupRule("separate"), "o": GroupRule("separate"),
       "gate_up": GroupRule("joint"), "down": GroupRule("separate")}


def test_units_of_adjacent_layers_merge_in_spans_from_each_run_of_layers():
    layout = llama7b_layout(num_layers=8)
    config = JointRankConfig(rules={"gate_up": GroupRule("joint", "0-1,3-7"), "qk": GroupRule("separate", "0-2")},
                             ratio=0.25, share_layers=2)
    plan = make_plan(layout, config)
    spans = {}
    for e in plan.factorised:
        layers = sorted({int(m.split(".")[2]) for m in e.members})
        spans.setdefault(e.group, []).append(layers)
    # runs 0-1 and 3-7 cut into pairs from their first layer; 7 has no partner and keeps its own basis
    assert spans["gate_up"] == [[0, 1], [3, 4], [5, 6], [7]]
    # a separate Q/K shares Q with Q and K with K, named by the member so the two bases never collide
    assert spans["q_proj"] == [[0, 1]] and spans["k_proj"] == [[0, 1]] and spans["qk"] == [[2], [2]]
    for e in plan.factorised:
        assert e.structure == ("joint" if e.span > 1 or e.group == "gate_up" else "separate")
        # the basis once (k x d_in), an output factor per member and layer
        assert e.params_after == e.rank * (e.d_in + sum(e.d_outs))
        assert e.params_before == e.d_in * sum(e.d_outs)
    # the same budget buys a higher rank when the basis is stored once for two layers
    per_layer = make_plan(layout, JointRankConfig(rules={"gate_up": GroupRule("joint")}, target=0.2, scope="decoder"))
    shared = make_plan(layout, JointRankConfig(rules={"gate_up": GroupRule("joint")}, target=0.2, scope="decoder",
                                               share_layers=2))
    assert min(p.params_removed for p in (shared, per_layer)) >= 0.2 * layout.params_decoder
    assert min(e.rank for e in shared.factorised) > max(e.rank for e in per_layer.factorised)


def test_a_shared_unit_is_the_best_rank_k_approximation_of_the_stacked_layers():
    model = tiny_model("llama", num_hidden_layers=4)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = jointrank.compress_(model, JointRankConfig(rules={"o": GroupRule("separate")}, ratio=0.3,
                                                        share_layers=2), progress=False)
    assert count_parameters(model) == result.plan.params_total_after
    for entry in result.plan.factorised:
        assert entry.span == 2
        stacked = torch.cat([dense[f"{m}.weight"] for m in entry.members]).double()
        s = torch.linalg.svdvals(stacked)
        with torch.no_grad():
            error = sum(float(((dense[f"{m}.weight"].double() - model.get_submodule(m).dense_weight().double())
                               ** 2).sum()) for m in entry.members)
        assert error == pytest.approx(float((s[entry.rank:] ** 2).sum()), rel=1e-4)  # Eckart-Young on the stack


def test_each_layer_projects_its_own_input_once(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=2)
    jointrank.compress_(model, JointRankConfig(rules={"gate_up": GroupRule("joint")}, ratio=0.3, share_layers=2),
                        progress=False)
    bases = [m for m in model.modules() if isinstance(m, SharedBasis)]
    assert len(bases) == 1  # gate and up of layers 0 and 1: four members, one basis
    calls = []
    linear = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        calls.append(weight is bases[0].weight)
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 7)))
    assert sum(calls) == 2  # once per layer, shared by that layer's gate and up


def test_calibration_statistics_are_pooled_over_the_layers_sharing_a_basis():
    from jointrank.methods.calibration import Calibration
    from jointrank.methods.common import output_error

    model = tiny_model("llama", num_hidden_layers=2)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = {}
    from jointrank.methods.calibration import InputStats

    for i in range(2):
        stats[i] = InputStats(48)
        model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, s=stats[i]: s.add(args[0]))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    config = JointRankConfig(rules={"o": GroupRule("separate")}, ratio=0.3, share_layers=2, method="svd_llm")
    result = jointrank.compress_(tiny_model("llama", num_hidden_layers=2), config, progress=False,
                                 calibration=Calibration(ids, "test", 0))
    row, = result.extra["calibration_errors"]
    assert row["tokens"] == 2 * ids.numel()
    pooled = (stats[0].second_moment + stats[1].second_moment) / 2
    members = ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    weights = [dense[f"{m}.weight"] for m in members]
    from jointrank.methods import factorise

    expected = factorise("svd_llm", weights, row["rank"], stats=type("S", (), {"second_moment": pooled})())
    assert row["calib_rel_error"] == pytest.approx(output_error(weights, expected, pooled), rel=1e-6)


def test_healing_refits_a_shared_unit_per_layer_and_trains_its_basis_once():
    from jointrank.heal import DistillSettings, distill_, refit_, teacher_copy, trainable_factors

    model = tiny_model("qwen2", num_hidden_layers=4)
    teacher = teacher_copy(model)
    jointrank.compress_(model, JointRankConfig(rules=ALL, ratio=0.4, share_layers=2), progress=False)
    before = count_parameters(model)
    ids = torch.randint(0, 96, (6, 20), generator=torch.Generator().manual_seed(1))
    report = refit_(model, teacher, ids, progress=False)
    assert sum(u["rel_error_after"] for u in report["units"]) < sum(u["rel_error_before"] for u in report["units"])
    names = [n for n, _ in trainable_factors(model)]
    assert len(names) == len(set(names)) and sum(n.endswith("_basis.weight") for n in names) == sum(
        isinstance(m, SharedBasis) for m in model.modules())
    distill_(model, teacher, ids, DistillSettings(steps=4, lr=1e-3), progress=False)
    assert count_parameters(model) == before


def test_global_allocation_shares_bases_and_streams_the_same_plan(tmp_path):
    from tiny_models import save_tiny

    from jointrank.stream import StreamOptions, compress_checkpoint

    source = save_tiny("llama", tmp_path / "src", num_hidden_layers=4)
    config = JointRankConfig(rules=ALL, target=0.3, scope="decoder", allocation="global", share_layers=2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    result = jointrank.compress_(model, config, progress=False)
    assert {span_of(e.members) for e in result.plan.factorised} == {2}
    assert result.params_decoder_after <= (1 - 0.3) * result.params_decoder_before
    streamed = compress_checkpoint(source, tmp_path / "out", config, options=StreamOptions(progress=False))
    assert streamed.result.plan == result.plan


def test_only_the_named_groups_share_across_layers():
    layout = llama7b_layout(num_layers=4)
    plan = make_plan(layout, JointRankConfig(rules=ALL, ratio=0.3, share_layers=2, share_groups=["down"]))
    spans = {(e.group, e.span) for e in plan.factorised}
    assert ("down", 2) in spans and ("down", 1) not in spans
    assert {g for g, span in spans if span == 1} == {"qk", "v", "o", "gate_up"}


@pytest.mark.parametrize("extra,message", [
    (["--share-layers", "0"], "--share-layers must be a whole number of layers, at least 1"),
    (["--share-layers", "2", "--share-groups", "mlp"], "--share-groups takes group names"),
    (["--share-groups", "down"], "give --share-layers N"),
    (["--share-layers", "2", "--method", "llm_rom", "--calibration", "self:64"], "llm_rom is sequential"),
    (["--share-layers", "2", "--allocation", "loss", "--target", "0.1", "--calibration", "self:64"],
     "--share-layers with --allocation loss is not supported"),
])
def test_cli_refuses_what_cannot_share_a_basis_in_one_line(tmp_path, capsys, extra, message):
    path = tmp_path / "src"
    tiny_model("llama").save_pretrained(path)
    rank = [] if "--target" in extra else ["--ratio", "0.5"]
    code = main(["compress", str(path), "--o", "separate", *rank, "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_plan_and_info_name_the_layers_a_basis_serves(tmp_path, capsys):
    path = tmp_path / "src"
    tiny_model("llama").save_pretrained(path)  # 3 layers: 0-1 share, 2 keeps its own
    assert main(["compress", str(path), "--o", "separate", "--ratio", "0.4", "--share-layers", "2",
                 "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "joint across 2 layers" in printed and "0-1" in printed
    assert main(["info", str(tmp_path / "o"), "--layers"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("0-1", "2 "))]
    assert [r[0] for r in rows] == ["0-1", "2"]
    assert rows[0][3:6] == ["joint", "across", "2"] and rows[1][3] == "separate"
