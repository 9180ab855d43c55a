"""Global allocation under streaming (issue #13): the plan read from the safetensors files, unit by unit, is the
in-memory plan byte for byte, and the streamed checkpoint is the in-memory one."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import jointrank
from jointrank.cli import main
from jointrank.plan import GroupRule, JointRankConfig
from jointrank.stream import StreamOptions, compress_checkpoint


@pytest.mark.parametrize("arch,prior", [("mistral", "flat"), ("gemma3_text", "residual")])
def test_streamed_global_allocation_is_the_in_memory_one(tmp_path, arch, prior):
    config = JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint"), "o": GroupRule("separate")},
                             target=0.2, scope="decoder", allocation="global", allocation_prior=prior)
    source = tmp_path / "src"
    tiny_model(arch).save_pretrained(source)  # same weights for both paths: the allocation reads spectra
    streamed = compress_checkpoint(source, tmp_path / "out", config, options=StreamOptions(progress=False))
    model = AutoModelForCausalLM.from_pretrained(source)
    in_memory = jointrank.compress_(model, config, progress=False)
    plan = streamed.result.plan
    assert json.dumps(plan.to_dict(), sort_keys=True) == json.dumps(in_memory.plan.to_dict(), sort_keys=True)
    assert len({e.rank for e in plan.factorised}) > 1, "global allocation should give units different ranks"
    assert streamed.result.params_decoder_after == in_memory.params_decoder_after == plan.params_decoder_after
    stored = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        stored.update(load_file(str(shard)))
    state = model.state_dict()
    assert set(stored) >= {n for n in state if "basis" in n or ".out." in n}
    for name, tensor in state.items():
        if name in stored:
            assert torch.equal(stored[name], tensor), name
    manifest = json.loads((tmp_path / "out" / "jointrank_manifest.json").read_text())
    assert manifest["config"]["allocation_prior"] == prior


def test_cli_streams_global_allocation_with_a_prior(tmp_path, capsys):
    source = tmp_path / "src"
    tiny_model("gemma3_text").save_pretrained(source)
    code = main(["compress", str(source), "--out", str(tmp_path / "out"), "--stream", "--qk", "joint",
                 "--gate-up", "joint", "--target", "0.2", "--scope", "decoder", "--allocation", "global",
                 "--allocation-prior", "residual"])
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "jointrank_manifest.json").read_text())
    assert manifest["config"]["allocation"] == "global" and manifest["config"]["allocation_prior"] == "residual"
