"""The unit engine and the format it writes (issue #13): every path names a unit's tensors the same way, the solver
settings reach every method on every path, and checkpoints written before the `structure` rename still load."""

import json

import pytest
import torch
from conftest import tiny_model

import jointrank
from jointrank.cli import main
from jointrank.engine import run_unit
from jointrank.format import MANIFEST_NAME, unit_tensors
from jointrank.linalg import Solver
from jointrank.plan import GroupRule, JointRankConfig
from jointrank.stream import StreamOptions, compress_checkpoint

CONFIG = JointRankConfig(rules={"qk": GroupRule("joint"), "v": GroupRule("separate"), "gate_up": GroupRule("joint")},
                         ratio=0.5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_the_model_holds_exactly_the_tensors_the_format_names(arch):
    model = tiny_model(arch)
    biases = {n: m.bias.detach().clone() for n, m in model.named_modules() if getattr(m, "bias", None) is not None}
    result = jointrank.compress_(model, CONFIG, progress=False)
    state = model.state_dict()
    for entry in result.plan.factorised:
        weights = [torch.zeros(d, entry.d_in) for d in entry.d_outs]  # names and shapes only
        factors, _, _ = run_unit(entry, [w + torch.eye(*w.shape) for w in weights], "svd")
        named = unit_tensors(entry, factors, {m: biases[m] for m in entry.members if m in biases},
                             dtype=torch.float32)
        unit_state = {n for n in state if any(n.startswith(m + ".") for m in entry.members)
                      or n.startswith(f"{entry.members[0].rsplit('.', 1)[0]}.{entry.group}_basis")}
        assert set(named) == unit_state
        for name, tensor in named.items():
            assert state[name].shape == tensor.shape, name
            if name.endswith(".out.bias"):
                assert torch.equal(state[name], tensor)  # biases are kept exact


def test_a_seed_reaches_every_method_when_streaming(tmp_path, monkeypatch):
    """The solver's seed and device used to reach plain svd only (streaming special-cased it); balanced, which also
    runs the randomized solver, got the default seed whatever --seed said."""
    import dataclasses

    from jointrank.methods import registry

    seen = []
    real = registry._REGISTRY["balanced"]

    def spy(weights, k, **kw):
        seen.append(kw["solver"])
        return real.factorise(weights, k, **kw)

    patched = dataclasses.replace(real, factorise=spy)
    monkeypatch.setitem(registry._REGISTRY, "balanced", patched)
    monkeypatch.setitem(registry._BY_SETTINGS, real.settings, patched)
    source = tmp_path / "src"
    tiny_model("mistral").save_pretrained(source)
    config = JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.3, method="balanced", solver="rsvd")
    compress_checkpoint(source, tmp_path / "out", config, options=StreamOptions(seed=7, device="cpu", progress=False))
    assert seen and set(seen) == {Solver("rsvd", seed=7, device="cpu")}


def test_the_randomized_solver_seed_changes_balanced_factors_and_only_it():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(300, 200, generator=gen), torch.randn(100, 200, generator=gen)]
    from jointrank.methods import factorise

    one, again = (factorise("balanced", weights, 5, solver=Solver("rsvd", seed=1)) for _ in range(2))
    other = factorise("balanced", weights, 5, solver=Solver("rsvd", seed=2))
    assert torch.equal(one.basis, again.basis) and not torch.equal(one.basis, other.basis)


def test_solver_settings_are_one_value_every_method_accepts():
    weights = [torch.randn(24, 16, generator=torch.Generator().manual_seed(0))]
    from jointrank.methods import factorise

    by_name = factorise("balanced", weights, 4, solver="svd")
    by_value = factorise("balanced", weights, 4, solver=Solver("svd", seed=3, device="cpu"))
    assert torch.equal(by_name.basis, by_value.basis)


def _as_written_before_the_rename(manifest: dict) -> dict:
    """What jointrank wrote before `structure`: the same records under the key "method"."""
    def rename(d):
        return {("method" if k == "structure" else k): v for k, v in d.items()}

    old = json.loads(json.dumps(manifest))
    old["plan"]["entries"] = [rename(e) for e in old["plan"]["entries"]]
    old["plan"]["config"]["rules"] = {g: rename(r) for g, r in old["plan"]["config"]["rules"].items()}
    old["config"]["rules"] = {g: rename(r) for g, r in old["config"]["rules"].items()}
    old["result"]["units"] = [rename(u) for u in old["result"]["units"]]
    for key in ("allocation_prior",):  # settings that did not exist then
        old["config"].pop(key, None)
        old["plan"]["config"].pop(key, None)
    return old


def test_checkpoints_from_before_the_structure_rename_still_load_and_verify(tmp_path, capsys):
    model = tiny_model("llama")
    config = CONFIG
    result = jointrank.compress_(model, config, progress=False)
    out = jointrank.save(model, None, tmp_path / "ck", result, source="tiny", config=config)
    tokens = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = model(tokens).logits
    path = out / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    assert "structure" in manifest["plan"]["entries"][0] and "method" not in manifest["plan"]["entries"][0]
    path.write_text(json.dumps(_as_written_before_the_rename(manifest), indent=2))
    assert torch.equal(jointrank.load(out)(tokens).logits, expected)
    assert main(["info", str(out)]) == 0
    assert "joint" in capsys.readouterr().out
