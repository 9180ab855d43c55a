"""The real Gemma-3-270M (the embedded default): paper-20 lands on its target, reloads and generates."""

import json

import pytest
import torch
from conftest import requires_gemma

import jointrank
from jointrank.cli import main

pytestmark = [pytest.mark.slow, requires_gemma]


@pytest.fixture(scope="module")
def gemma():
    from jointrank.sources import load_model

    model, tokenizer, _ = load_model("gemma-3-270m")
    return model, tokenizer


def test_paper_20_decoder_scope_lands_within_a_point_and_generates(tmp_path, capsys):
    out = tmp_path / "gemma-jrk20"
    assert main(["compress", "gemma-3-270m", "--preset", "paper-20", "--scope", "decoder", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    params = json.loads((out / "jointrank_manifest.json").read_text())["result"]["params"]
    decoder_removed = 1 - params["decoder_after"] / params["decoder_before"]
    whole_removed = 1 - params["total_after"] / params["total_before"]
    print(f"\nGemma-3-270M paper-20 (decoder scope): decoder -{decoder_removed:.2%}, whole model -{whole_removed:.2%}")
    assert abs(decoder_removed - 0.20) < 0.01
    assert params["decoder_before"] - params["decoder_after"] == params["total_before"] - params["total_after"]
    assert "decoder layers" in printed
    model = jointrank.load(out)
    assert jointrank.architectures.count_parameters(model) == params["total_after"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Once upon a time", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 8
    assert tokenizer.decode(generated[0, ids["input_ids"].shape[1]:]).strip()


def test_paper_20_whole_model_scope_is_refused_as_unreachable(capsys):
    assert main(["plan", "gemma-3-270m", "--preset", "paper-20"]) == 1
    assert "cannot remove 20.0% of the model's parameters" in capsys.readouterr().err


def test_full_rank_joint_on_the_real_model_keeps_its_logits(gemma):
    import copy

    model, tokenizer = gemma
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    work = copy.deepcopy(model)
    config = jointrank.JointRankConfig(rules={"qk": jointrank.GroupRule("joint"),
                                              "gate_up": jointrank.GroupRule("joint")},
                                       ratio=1.0, only_if_smaller=False)
    jointrank.compress_(work, config, progress=False)
    with torch.no_grad():
        after = work(ids).logits
    # full rank = exact up to float32 round-off; judged relative to the logit scale
    assert float((after - before).abs().max()) < 1e-3 * float(before.abs().max())
    assert torch.equal(after.argmax(-1), before.argmax(-1))
