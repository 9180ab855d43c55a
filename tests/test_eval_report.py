"""Results files, Markdown and base-vs-compressed comparison (synthetic results; no model needed)."""

from __future__ import annotations

import json
import math

import pytest

from jointrank.errors import JointRankError
from jointrank.evaluate import parse_tasks, report
from jointrank.cli import main  # `eval` and `compare` are subcommands of the one CLI


def results(spec: str, accs: dict, ppl: float, n: int = 400) -> dict:
    res = {"wikitext2": {"perplexity": ppl, "mean_nll": math.log(ppl), "seqlen": 2048, "windows": 4,
                         "windows_available": 142, "tokens_in_text": 292283, "predicted_tokens": 8188,
                         "wall_time_s": 10.0, "source": "local:/data"}}
    for task, acc in accs.items():
        se = math.sqrt(acc * (1 - acc) / (n - 1))
        res[task] = {"acc": acc, "acc_stderr": se, "acc_norm": acc + 0.01, "acc_norm_stderr": se, "n": n,
                     "n_total": 1838, "sample_seed": 1234, "indices": list(range(n)), "wall_time_s": 5.0,
                     "source": "local:/data", "lm_eval_task": f"jointrank_{task}", "builtin_task_version": 1.0}
    return {"schema": report.SCHEMA, "model": {"spec": spec, "parameters": 10}, "manifest": None,
            "command": f"jointrank eval {spec}", "settings": {"tasks": list(res), "limit": n, "seed": 1234,
            "seqlen": 2048, "max_windows": 4, "batch_size": 8, "ppl_batch_size": 1, "dtype": "float32",
            "data_source": "local:/data"}, "versions": {"torch": "x"}, "machine": {}, "started_utc": "now",
            "wall_time_s": 20.0, "complete": True, "pending": [], "results": res}


BASE = results("base", {"piqa": 0.70, "arc_easy": 0.60}, ppl=20.0)
COMP = results("comp", {"piqa": 0.63, "arc_easy": 0.59}, ppl=25.0)


def test_retention_per_task_and_of_the_average():
    cmp = report.compare(BASE, COMP)
    rows = {r["task"]: r for r in cmp["rows"]}
    assert rows["piqa"]["retention"] == pytest.approx(0.63 / 0.70)
    assert rows["piqa"]["delta"] == pytest.approx(-0.07)
    se = math.sqrt(BASE["results"]["piqa"]["acc_stderr"] ** 2 + COMP["results"]["piqa"]["acc_stderr"] ** 2)
    assert rows["piqa"]["delta_stderr"] == pytest.approx(se)
    assert rows["piqa"]["beyond_2se"] is True and rows["arc_easy"]["beyond_2se"] is False  # 7 points vs 1 point
    assert rows["wikitext2"]["metric"] == "perplexity" and rows["wikitext2"]["retention"] == pytest.approx(1.25)
    avg = cmp["average"]
    assert avg["tasks"] == ["piqa", "arc_easy"]  # perplexity is not averaged with accuracies
    assert avg["retention_of_mean"] == pytest.approx((0.63 + 0.59) / (0.70 + 0.60))
    assert avg["mean_of_retentions"] == pytest.approx((0.63 / 0.70 + 0.59 / 0.60) / 2)
    assert report.compare(BASE, COMP, metric="acc_norm")["rows"][1]["base"] == pytest.approx(0.71)


def test_paired_stderr_from_per_document_scores():
    base, comp = json.loads(json.dumps(BASE)), json.loads(json.dumps(COMP))
    n = 400
    # comp = base except 28 documents flipped from right to wrong: acc 0.70 -> 0.63
    b = "1" * 280 + "0" * 120
    c = "0" * 28 + "1" * 252 + "0" * 120
    base["results"]["piqa"]["per_doc"] = {"acc": b}
    comp["results"]["piqa"]["per_doc"] = {"acc": c}
    row = report.compare(base, comp)["rows"][1]
    d = [-1] * 28 + [0] * 372
    mean = sum(d) / n
    expected = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    assert row["paired"] and row["delta_stderr"] == pytest.approx(expected)
    assert row["delta_stderr"] < 0.5 * report.compare(BASE, COMP)["rows"][1]["delta_stderr"]  # far tighter
    assert "paired over the same documents" in report.render_compare(report.compare(base, comp), markdown=True)


def test_compare_flags_different_samples():
    other = results("comp", {"piqa": 0.63}, ppl=25.0, n=300)
    notes = report.compare(BASE, other)["notes"]
    assert any(n.startswith("piqa:") for n in notes)
    assert not any(n.startswith("wikitext2") for n in notes)  # same windows on both sides


def test_compare_pairs_a_small_sample_with_the_same_documents_of_a_larger_one():
    base = results("base", {"piqa": 0.5}, ppl=20.0, n=400)
    comp = results("comp", {"piqa": 0.5}, ppl=25.0, n=100)
    comp["results"]["piqa"]["indices"] = list(range(0, 400, 4))  # nested in the base's 400 documents
    base["results"]["piqa"]["per_doc"] = {"acc": "1100" * 100}  # 50% overall, 100% on every 4th document
    comp["results"]["piqa"]["per_doc"] = {"acc": "1" * 90 + "0" * 10}
    row = report.compare(base, comp)["rows"][1]
    assert row["same_documents"] and row["paired"]
    assert row["base"] == pytest.approx(1.0) and row["comp"] == pytest.approx(0.9)  # base on comp's documents only
    d = [0] * 90 + [-1] * 10
    mean = sum(d) / 100
    assert row["delta_stderr"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 99 / 100))
    assert any("base restricted to the 100 documents" in n for n in report.compare(base, comp)["notes"])
    # samples that are not nested stay unpaired and flagged
    comp["results"]["piqa"]["indices"] = list(range(300, 400))
    comp["results"]["piqa"]["n_total"] = 1838
    base["results"]["piqa"]["indices"] = list(range(350, 750))
    assert not report.compare(base, comp)["rows"][1]["paired"]


def test_compare_cli_prints_table_and_writes_markdown(tmp_path, capsys):
    b, c, md = tmp_path / "b.json", tmp_path / "c.json", tmp_path / "cmp.md"
    report.write_json(BASE, b)
    report.write_json(COMP, c)
    assert main(["compare", str(b), str(c), "--out", str(md)]) == 0
    out = capsys.readouterr().out
    assert "piqa" in out and "90.00" in out and "average" in out and "93.85" in out  # 1.22 / 1.30
    text = md.read_text()
    assert text.startswith("# `comp` vs `base`") and "| piqa | acc | 70.00 ± " in text and " *" in text


def test_comparison_table_for_compress_eval():
    text = report.comparison_table(BASE, COMP)
    assert text.splitlines()[0] == "base: base   compressed: comp" and "93.85" in text


def test_results_markdown_states_sample_and_errors():
    text = report.render_results(BASE)
    assert "first 4 of 142 windows" in text and "400 / 1838" in text and "seeded sample (seed 1234)" in text
    assert "70.00 ± 2.29" in text and "jointrank eval base" in text
    partial = dict(BASE, complete=False, pending=["boolq"])
    assert "Incomplete run" in report.render_results(partial)


def test_bad_results_files_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(JointRankError, match="not valid JSON"):
        report.read_json(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(JointRankError, match="not a jointrank eval results file"):
        report.read_json(other)
    assert main(["compare", str(tmp_path / "missing.json"), str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "results file not found" in err


def test_eval_cli_rejects_bad_input_before_loading(tmp_path, capsys):
    assert main(["eval", "no-such-model-xyz", "--tasks", "piqa,pika"]) == 1
    assert "unknown task pika" in capsys.readouterr().err
    assert main(["eval", "no-such-model-xyz", "--tasks", "piqa", "--out", str(tmp_path / "x.txt")]) == 1
    assert "--out must name a .json file" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "wikitext2", "--data-dir", str(tmp_path)]) == 1
    assert "wikitext2: missing in data dir" in capsys.readouterr().err  # data checked before the model loads


def test_task_groups():
    assert parse_tasks("wikitext2,paper7") == ["wikitext2", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa",
                                               "arc_easy", "arc_challenge"]
    assert parse_tasks("piqa,piqa, zeroshot")[:2] == ["piqa", "hellaswag"]
    with pytest.raises(JointRankError, match="no tasks"):
        parse_tasks(",")


def test_results_record_the_compression_manifest_through_the_one_reader(tmp_path):
    """An evaluation records the evaluated checkpoint's manifest, read by jointrank.read_manifest; a dense model
    directory or a hub id has none; a damaged manifest is an error, not a silently empty record."""
    import jointrank
    from jointrank import GroupRule, JointRankConfig
    from jointrank.evaluate.run import manifest_if_any
    from tiny_models import tiny_model

    model = tiny_model("llama")
    config = JointRankConfig(rules={"qk": GroupRule("joint")}, ratio=0.5)
    result = jointrank.compress_(model, config, progress=False)
    checkpoint = jointrank.save(model, None, tmp_path / "ck", result, source="t")
    assert manifest_if_any(str(checkpoint)) == jointrank.read_manifest(checkpoint)
    assert manifest_if_any(str(checkpoint))["plan"]["entries"]
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    assert manifest_if_any(str(tmp_path / "dense")) is None
    assert manifest_if_any("org/some-model") is None and manifest_if_any(None) is None
    (checkpoint / "jointrank_manifest.json").write_text("{not json")
    with pytest.raises(JointRankError, match="not valid JSON"):
        manifest_if_any(str(checkpoint))


def wikitext_dir(tmp_path):
    """A stand-in WikiText-2 test split (the row count the loader checks) under tmp_path/data."""
    data = tmp_path / "data" / "wikitext-2-raw"
    data.mkdir(parents=True)
    (data / "wiki.test.raw").write_text(" = Title = \n the cat sat on the mat and the dog ran \n" * 2179)  # 4358 rows
    return tmp_path / "data"


def test_eval_cli_window_bos_scores_the_windows_started_with_bos(model_dir, tmp_path, capsys):
    """`eval --window-bos` reports the perplexity of the same windows each started with BOS (equal to the library
    call), records it in the results and their Markdown, and compare refuses to set it against a standard run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jointrank.evaluate.perplexity import load_text, perplexity

    wikitext_dir(tmp_path)
    common = ["eval", str(model_dir), "--tasks", "wikitext2", "--data-dir", str(tmp_path / "data"), "--seqlen", "16",
              "--max-windows", "6", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "plain.json")]) == 0
    assert main(common + ["--window-bos", "--out", str(tmp_path / "bos.json")]) == 0
    bos = json.loads((tmp_path / "bos.json").read_text())
    entry = bos["results"]["wikitext2"]
    assert entry["window_bos"] is True and bos["settings"]["window_bos"] is True
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    text = load_text("wikitext2", tmp_path / "data")
    direct = perplexity(model, tokenizer, text, seqlen=16, max_windows=6, progress=False, window_bos=True)
    assert entry["mean_nll"] == pytest.approx(direct["mean_nll"], rel=1e-6)
    plain = json.loads((tmp_path / "plain.json").read_text())["results"]["wikitext2"]
    assert plain["window_bos"] is False and plain["mean_nll"] != pytest.approx(entry["mean_nll"], rel=1e-4)
    assert "each started with BOS" in (tmp_path / "bos.md").read_text()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "plain.json"), str(tmp_path / "bos.json")]) == 1
    assert "not comparable" in capsys.readouterr().err


def test_compress_eval_window_bos_measures_before_and_after_on_bos_windows(model_dir, tmp_path):
    """compress --eval wikitext2 --eval-window-bos: the before/after perplexities in the manifest are on the windows
    started with BOS, the dense one equal to the library call on the dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import jointrank
    from jointrank.evaluate.perplexity import load_text, perplexity

    data = wikitext_dir(tmp_path)
    out = tmp_path / "ck"
    assert main(["compress", str(model_dir), "--qk", "joint", "--ratio", "0.5", "--out", str(out), "--eval",
                 "wikitext2", "--eval-window-bos", "--eval-max-windows", "3", "--data-dir", str(data)]) == 0
    evaluation = jointrank.read_manifest(out)["evaluation"]
    before, after = (evaluation[k]["results"]["wikitext2"] for k in ("before", "after"))
    assert before["window_bos"] is True and after["window_bos"] is True and before["windows"] == 3
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    direct = perplexity(model, tokenizer, load_text("wikitext2", data), seqlen=2048, max_windows=3, progress=False,
                        window_bos=True)
    assert before["mean_nll"] == pytest.approx(direct["mean_nll"], rel=1e-6)
