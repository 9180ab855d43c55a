"""NaN/Inf: refused in the weights before any work (naming the tensor), and in factors before anything is saved."""

import pytest
import torch
from conftest import tiny_model

import jointrank
from jointrank.errors import JointRankError
from jointrank.plan import GroupRule, JointRankConfig
from jointrank.stream import StreamOptions, compress_checkpoint

CONFIG = JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.5, solver="gram")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_before_anything_changes(value):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(JointRankError, match="non-finite values .* in model.layers.2.mlp.up_proj.weight"):
        jointrank.compress_(model, CONFIG, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys()  # nothing was factorised or replaced
    assert all(torch.equal(before[k], after[k]) or not torch.isfinite(before[k]).all() for k in before)


def test_non_finite_factors_are_never_saved(tmp_path, monkeypatch):
    """A solver that returns NaN (as gram/rsvd did on bad input) stops the run before a checkpoint is written."""
    import jointrank.linalg as linalg

    real = linalg.joint_rank_k

    def broken(*args, **kwargs):
        factors = real(*args, **kwargs)
        factors.basis[0, 0] = float("nan")
        return factors

    monkeypatch.setattr(linalg, "joint_rank_k", broken)
    # the svd method bound the name when jointrank.methods was imported: patch it where it is called too
    import jointrank.methods.svd as svd_method

    monkeypatch.setattr(svd_method, "joint_rank_k", broken)
    model = tiny_model("llama")
    with pytest.raises(JointRankError, match="gave non-finite factors"):
        jointrank.compress_(model, CONFIG, progress=False)

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    with pytest.raises(JointRankError, match="gave non-finite factors; nothing was saved"):
        compress_checkpoint(src, tmp_path / "out", CONFIG, options=StreamOptions(progress=False))
    assert not (tmp_path / "out").exists()
