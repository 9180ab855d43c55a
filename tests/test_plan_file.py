"""`jointrank compress --plan FILE`: a plan written by `jointrank plan --json` is followed exactly, in memory and
streamed; it is how loss-aware allocation (which runs the model on calibration text) reaches --stream; a plan that
cannot be followed is refused in one line, before anything is written."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open

from jointrank.cli import main


def tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_saved_plan_compresses_to_the_same_bytes_in_memory_and_streamed(model_dir, tmp_path, capsys):
    flags = ["--qk", "joint", "--gate-up", "joint", "--down", "separate", "--target", "0.3", "--scope", "decoder",
             "--allocation", "global", "--share-layers", "2"]
    assert run(["plan", model_dir, *flags, "--no-estimate", "--json", tmp_path / "plan.json"], capsys)[0] == 0
    assert run(["compress", model_dir, *flags, "--out", tmp_path / "direct"], capsys)[0] == 0
    assert run(["compress", model_dir, "--plan", tmp_path / "plan.json", "--out", tmp_path / "planned"], capsys)[0] == 0
    assert run(["compress", model_dir, "--plan", tmp_path / "plan.json", "--stream", "--out", tmp_path / "streamed"],
               capsys)[0] == 0
    direct = tensors(tmp_path / "direct")
    for other in ("planned", "streamed"):
        got = tensors(tmp_path / other)
        assert sorted(got) == sorted(direct)
        assert all(torch.equal(got[k], direct[k]) for k in direct), other
        manifest = json.loads((tmp_path / other / "jointrank_manifest.json").read_text())
        assert manifest["plan"] == json.loads((tmp_path / "plan.json").read_text())


def test_loss_aware_allocation_reaches_streaming_through_a_plan(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JOINTRANK_CACHE", str(tmp_path / "cache"))
    plan_file = tmp_path / "loss.json"
    code, _, err = run(["plan", model_dir, "--qk", "joint", "--gate-up", "joint", "--o", "separate", "--target",
                        "0.2", "--scope", "decoder", "--allocation", "loss", "--calibration", "self:64",
                        "--no-estimate", "--json", plan_file], capsys)
    assert code == 0, err
    assert "--allocation loss plans from the loss measured on calibration text: sampling 64 tokens first" in err
    cached = sorted((tmp_path / "cache").rglob("selfgen-*"))
    assert len(cached) == 1  # cached where compress --calibration self:64 finds it
    code, _, err = run(["compress", model_dir, "--plan", plan_file, "--stream", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    plan = json.loads(plan_file.read_text())
    stored = tensors(tmp_path / "o")
    for e in plan["entries"]:
        if e["structure"] != "keep":  # every unit at the rank the loss-aware plan chose
            assert stored[f"{e['members'][0]}.out.weight"].shape[1] == e["rank"]


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "0.5"], "--plan FILE is the whole plan: drop --ratio"),
    (["--qk", "joint"], "drop --qk"),
    (["--share-layers", "2"], "drop --share-layers"),
])
def test_a_plan_with_planning_flags_is_refused(model_dir, tmp_path, capsys, extra, message):
    (tmp_path / "p.json").write_text("{}")
    code, _, err = run(["compress", model_dir, "--plan", tmp_path / "p.json", "--out", tmp_path / "o", *extra], capsys)
    assert code == 1 and message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_plan_that_cannot_be_followed_is_refused_in_one_line(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JOINTRANK_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    tiny_model("llama", hidden_size=64).save_pretrained(other)
    good = tmp_path / "good.json"
    assert run(["plan", model_dir, "--qk", "joint", "--ratio", "0.5", "--no-estimate", "--json", good], capsys)[0] == 0
    aware = tmp_path / "aware.json"
    assert run(["plan", model_dir, "--qk", "joint", "--ratio", "0.5", "--method", "svd_llm", "--calibration",
                "self:64", "--no-estimate", "--json", aware], capsys)[0] == 0
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "alien.json").write_text(json.dumps({"entries": "nope"}))
    cases = [
        (["--plan", tmp_path / "missing.json"], "does not exist"),
        (["--plan", tmp_path / "broken.json"], "is not a plan JSON"),
        (["--plan", tmp_path / "alien.json"], "is not a plan as `jointrank plan --json` writes it"),
        (["--plan", aware, "--stream"], "needs the in-memory path"),
    ]
    for extra, message in cases:
        code, _, err = run(["compress", model_dir, "--out", tmp_path / "o", *extra], capsys)
        assert code == 1 and message in err.strip().splitlines()[-1] and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "o").exists()
    code, _, err = run(["compress", other, "--plan", good, "--out", tmp_path / "o"], capsys)
    assert code == 1 and "the plan does not fit this model" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
