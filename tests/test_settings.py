"""Versioned method settings (issue #13): every hyperparameter is a typed, versioned value; it reaches the
factorisation, is written to the manifest with its defaults, and reads back; the registry is keyed by its type."""

import json

import pytest
import torch
from conftest import tiny_model

import jointrank
from jointrank import GroupRule, JointRankConfig, JointRankError
from jointrank.methods import ASVDSettings, BalancedSettings, SVDLLMSettings, factorise, method_of, settings_for
from jointrank.methods.calibration import Calibration, InputStats


def stats_of(d_in: int, seed: int = 0) -> InputStats:
    x = torch.randn(256, d_in, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 3, d_in)
    stats = InputStats(d_in)
    stats.add(x)
    return stats


def test_a_spec_and_its_settings_are_the_same_method():
    assert settings_for("balanced:heads") == BalancedSettings(weighting="heads")
    assert settings_for("svd_llm", {"damping": "0.05"}) == SVDLLMSettings(damping=0.05)  # CLI strings: typed
    assert method_of(ASVDSettings()).name == "asvd"


def test_hyperparameters_reach_the_factorisation():
    w = [torch.randn(40, 24, generator=torch.Generator().manual_seed(1))]
    stats = stats_of(24)
    default = factorise("svd_llm", w, 6, stats=stats)
    heavy = factorise("svd_llm", w, 6, stats=stats, params={"damping": 0.5})
    assert torch.equal(heavy.basis, factorise(SVDLLMSettings(damping=0.5), w, 6, stats=stats).basis)
    assert not torch.allclose(default.basis, heavy.basis)
    flat = factorise("asvd", w, 6, stats=stats, params={"alpha": 0.0})  # alpha 0: no channel scaling, plain SVD
    plain = factorise("svd", w, 6, solver="svd")
    assert torch.allclose(flat.reconstruct(0), plain.reconstruct(0), atol=1e-4)


def test_settings_go_into_the_manifest_and_read_back(tmp_path):
    config = JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint")}, ratio=0.5,
                             method=SVDLLMSettings(damping=0.05))
    assert config.method == "svd_llm" and config.method_params == {"damping": 0.05}
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    result = jointrank.compress_(model, config, progress=False, calibration=Calibration(ids, "random", 0))
    assert result.extra["method_settings"] == {"name": "svd_llm", "version": 1, "damping": 0.05}
    out = jointrank.save(model, None, tmp_path / "ck", result, source="tiny", config=config)
    manifest = json.loads((out / "jointrank_manifest.json").read_text())
    assert manifest["config"]["method_settings"] == {"name": "svd_llm", "version": 1, "damping": 0.05}
    assert JointRankConfig.from_dict(manifest["config"]) == config
    assert JointRankConfig.from_dict(manifest["plan"]["config"]).method_settings() == SVDLLMSettings(damping=0.05)


def test_defaults_are_recorded_and_a_newer_settings_version_is_refused():
    d = JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.5, method="asvd").to_dict()
    assert d["method_settings"] == {"name": "asvd", "version": 1, "alpha": 0.5}
    with pytest.raises(JointRankError, match="written by a newer jointrank"):
        JointRankConfig.from_dict({**d, "method_settings": {**d["method_settings"], "version": 2}})


def test_solver_and_allocation_are_typed_values_too(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from jointrank.linalg import Solver
    from jointrank.plan import GlobalAllocation
    from jointrank.stream import StreamOptions, compress_checkpoint

    config = JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint")}, target=0.2,
                             scope="decoder", solver=Solver("rsvd", seed=3), allocation=GlobalAllocation("depth"))
    assert (config.solver, config.seed, config.allocation, config.allocation_prior) == ("rsvd", 3, "global", "depth")
    assert JointRankConfig.from_dict(config.to_dict()) == config
    assert config.allocation_settings() == GlobalAllocation("depth") and config.solver_settings() == Solver("rsvd", 3)
    with pytest.raises(JointRankError, match="not a compression setting"):
        JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.5, solver=Solver("svd", device="cpu"))
    # the config's seed reaches both paths: streaming without a seed of its own writes the in-memory tensors
    source = tmp_path / "src"
    tiny_model("mistral").save_pretrained(source)
    streamed = compress_checkpoint(source, tmp_path / "out", config, options=StreamOptions(progress=False))
    assert streamed.result.extra["stream"]["seed"] == 3 and streamed.result.extra["stream"]["solver"] == "rsvd"
    model = AutoModelForCausalLM.from_pretrained(source)
    jointrank.compress_(model, config, progress=False)
    stored = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        stored.update(load_file(str(shard)))
    state = model.state_dict()
    factors = [n for n in state if ".out." in n or "basis" in n]
    assert factors and all(torch.equal(stored[n], state[n]) for n in factors)
