"""The experiment commands, run end to end on a tiny random Gemma-3 (GQA: 4 query heads, 1 KV head) with a tiny
word-level tokenizer built here, asserting properties that would fail if the code were wrong."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch

from conftest import needs_matplotlib

from research.experiments import common
from research.experiments.cli import main

WORDS = ("the a of and to in is was on for with as by at from it his her that this river city king army ship song "
         "town north south war year first new old great small long black white red green stone house road book "
         "light night day water fire iron gold bridge tower field forest hill lake").split()
SENTENCE = "the black river of iron city was on fire in the first year ."


def tiny_text(n_words: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(6, 14)
        n_words -= k
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)) + " .")
    return "\n".join(lines)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_gemma(vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                           query_pre_attn_scalar=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny model directory (what a user passes as MODEL) and a text file for perplexity."""
    root = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    model = tiny_gemma(len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(tiny_text(), encoding="utf-8")
    return root


def run_cli(argv, capsys=None) -> int:
    return main([str(a) for a in argv])


def read(path) -> dict:
    return json.loads(open(path).read())


# ---------------------------------------------------------------------------------------------------------------
# Core properties of the shared machinery.


def test_per_head_joint_at_full_rank_is_exact_and_gqa_expansion_keeps_logits():
    tok = tiny_tokenizer()
    model = tiny_gemma(len(tok))
    ids = torch.randint(5, len(tok), (2, 20), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    assert common.expand_kv_heads(model) == 4
    assert model.model.layers[0].self_attn.k_proj.out_features == 64
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    units = common.make_units(model, "qk", "joint", per_head=True)
    assert [u.label for u in units[:4]] == ["q_h0+k_h0", "q_h1+k_h1", "q_h2+k_h2", "q_h3+k_h3"]
    sweep = common.RankSweep(model, units)
    stats = sweep.apply(1.0)
    assert all(max(u["member_rel_errors"]) < 1e-5 for u in stats["units"])
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    # below full rank each member's error is what the singular values say it must be, not zero
    stats = sweep.apply(0.5)
    assert all(min(u["member_rel_errors"]) > 1e-3 for u in stats["units"])


def test_rank_sweep_equals_compress_and_counts_eq9():
    from jointrank.compress import compress_
    from jointrank.plan import GroupRule, JointRankConfig

    tok = tiny_tokenizer()
    ids = torch.randint(5, len(tok), (1, 16), generator=torch.Generator().manual_seed(1))
    swept = tiny_gemma(len(tok))
    sweep = common.RankSweep(swept, common.make_units(swept, "gate_up", "joint")
                             + common.make_units(swept, "qk", "separate"))
    stats = sweep.apply(0.3)
    reference = tiny_gemma(len(tok))
    config = JointRankConfig(rules={"gate_up": GroupRule("joint"), "qk": GroupRule("separate")}, ratio=0.3,
                             only_if_smaller=False)
    result = compress_(reference, config, progress=False)
    torch.testing.assert_close(swept(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # Eq. 9: joint gate/up k(d_gate + d_up + d_in); separate Q and K k(d_out + d_in) each
    d, f, q, kv = 64, 128, 64, 16
    k_gu, k_q, k_k = round(0.3 * 64), round(0.3 * 64), round(0.3 * 16)
    per_layer = k_gu * (f + f + d) + k_q * (q + d) + k_k * (kv + d)
    assert stats["params_factored"] == 2 * per_layer == sum(e.params_after for e in result.plan.factorised)
    sweep.restore()
    torch.testing.assert_close(swept(input_ids=ids).logits, tiny_gemma(len(tok))(input_ids=ids).logits)


def test_principal_angles_of_identical_row_spaces_are_zero():
    from research.experiments.spectra import principal_cosines, random_baseline, top_right

    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(0))
    mix = torch.randn(12, 12, generator=torch.Generator().manual_seed(1))
    a, b = top_right(w, 12), top_right(mix @ w, 12)  # same row space, different matrix
    torch.testing.assert_close(principal_cosines(a, b), torch.ones(12, dtype=torch.float64), atol=1e-8, rtol=0)
    orth = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).Q.T
    assert float(principal_cosines(orth[:5], orth[5:10]).max()) < 1e-8  # orthogonal subspaces: angles of 90 degrees
    base = random_baseline(640, 64, draws=5)
    assert 0.2 < base["mean_cos"] < 0.35  # random 64-dim subspaces of R^640 are far from aligned


def test_paired_standard_error():
    base = {"window_nll": [1.0, 2.0, 3.0]}
    other = {"window_nll": [1.1, 2.3, 3.2]}
    p = common.paired(base, other)
    assert p["delta_nll"] == pytest.approx(0.2)
    assert p["delta_nll_se"] == pytest.approx(math.sqrt(0.01) / math.sqrt(3))


# ---------------------------------------------------------------------------------------------------------------
# Every experiment command, end to end on the tiny model.


@needs_matplotlib
def test_spectra_command(tiny, tmp_path):
    assert run_cli(["experiment", "spectra", tiny / "model", "--out", tmp_path]) == 0
    r = read(tmp_path / "spectra.json")
    layer = r["layers"][0]
    # joint spectrum energy = sum of member energies (Frobenius norms add over stacked rows)
    for joint, parts in (("q+k", ("q", "k")), ("gate+up", ("gate", "up"))):
        total = sum(s * s for s in layer["spectra"][joint])
        assert total == pytest.approx(sum(s * s for p in parts for s in layer["spectra"][p]), rel=1e-4)
    assert r["meta"]["command"].startswith("python -m research.experiments experiment spectra")
    assert (tmp_path / "energy.png").stat().st_size > 0 and (tmp_path / "qk_angles.png").stat().st_size > 0


@needs_matplotlib
def test_joint_vs_separate_command(tiny, tmp_path):
    assert run_cli(["experiment", "joint-vs-separate", tiny / "model", "--text-file", tiny / "text.txt",
                    "--seqlen", 32, "--max-windows", 3, "--ratios", "1,0.5", "--out", tmp_path]) == 0
    for setting in ("gate_up", "qk", "qk_head"):
        r = read(tmp_path / f"{setting}.json")
        full = [p for p in r["points"] if p["ratio"] == 1.0]
        # at full rank both methods reproduce the dense model: errors ~0 and the same perplexity
        assert all(max(p["member_rel_error"].values()) < 1e-4 for p in full)
        assert all(abs(p["delta_nll"]) < 1e-4 for p in full)
        half = {p["method"]: p for p in r["points"] if p["ratio"] == 0.5}
        assert half["joint"]["params_factored"] < half["separate"]["params_factored"] or setting == "qk_head"
        assert (tmp_path / f"{setting}.png").stat().st_size > 0
    # per-head GQA accounting: the reference is the unexpanded Q+K (64 + 16 rows) x 64 per layer, 2 layers
    assert read(tmp_path / "qk_head.json")["points"][0]["params_reference"] == 2 * (64 + 16) * 64
    # Eq. 9 for the whole-matrix joint Q/K at ratio 0.5: k = 32, k (64 + 16 + 64) per layer
    joint = [p for p in read(tmp_path / "qk.json")["points"] if p["method"] == "joint" and p["ratio"] == 0.5][0]
    assert joint["params_factored"] == 2 * 32 * (64 + 16 + 64)


@needs_matplotlib
def test_layers_command(tiny, tmp_path):
    assert run_cli(["experiment", "layers", tiny / "model", "--text-file", tiny / "text.txt", "--seqlen", 32,
                    "--max-windows", 3, "--ratio", 0.25, "--out", tmp_path]) == 0
    r = read(tmp_path / "layers.json")
    rows = {(x["kind"], tuple(x["approximated_layers"])): x for x in r["rows"]}
    # 2 layers: quarters are [0], [1], [], [] -> only the non-empty ones change anything
    assert r["quarters"] == [[0], [1], [], []] or all(len(q) <= 1 for q in r["quarters"])
    single = [x for x in r["rows"] if x["kind"] == "single"]
    assert [x["approximated_layers"] for x in single] == [[0], [1]]
    # approximating one layer removes exactly half of what approximating both removes
    both = rows[("all_approximated", (0, 1))]
    assert single[0]["params_removed"] * 2 == both["params_removed"]
    assert (tmp_path / "layers.png").stat().st_size > 0


@needs_matplotlib
def test_denoise_command(tiny, tmp_path):
    assert run_cli(["experiment", "denoise", tiny / "model", "--text-file", tiny / "text.txt", "--seqlen", 32,
                    "--max-windows", 3, "--ratios", "1,0.9", "--configs", "gate_up,all", "--noise-seeds", 1,
                    "--out", tmp_path, "--tag", "second"]) == 0
    r = read(tmp_path / "denoise_second.json")  # a tagged run sits beside an untagged one
    assert (tmp_path / "denoise_second.png").is_file() and not (tmp_path / "denoise.json").exists()
    assert "--tag second" in r["meta"]["command"]
    full = [p for p in r["points"] if p["ratio"] == 1.0]
    assert all(abs(p["delta_nll"]) < 1e-4 and not p["improves_beyond_2se"] for p in full)
    assert r["window_noise"][0]["window_indices"] != r["probe"]["window_indices"]


def test_table1_command_records_infeasible_budgets(tiny, tmp_path):
    assert run_cli(["experiment", "table1", tiny / "model", "--text-file", tiny / "text.txt", "--seqlen", 32,
                    "--max-windows", 2, "--targets", "0.1,0.2", "--out", tmp_path]) == 0
    r = read(tmp_path / "table1.json")
    done = [x for x in r["rows"] if "infeasible" not in x]
    assert done, "some structure must fit"
    for row in done:  # the planner's target is met in its scope
        assert row[f"reduction_{row['scope']}"] >= row["target"] - 1e-9
    assert len(r["rows"]) == 2 * 2 * 3


@needs_matplotlib
def test_watermark_command_memorises_then_sweeps(tiny, tmp_path):
    # a random tiny model needs a larger learning rate than the paper's 7B models to memorise in a few steps
    assert run_cli(["watermark", tiny / "model", "--sentence", SENTENCE, "--text-file", tiny / "text.txt",
                    "--lr", 3e-3, "--max-steps", 40, "--batch", 4, "--context-tokens", 16, "--layers", "all",
                    "--ratios", "1,0.2", "--seqlen", 32, "--max-windows", 2, "--out", tmp_path]) == 0
    r = read(tmp_path / "watermark.json")
    assert not r["before"]["reproduced"]
    assert r["after_fine_tune"]["reproduced"], "fine-tuning did not make greedy decoding reproduce the sentence"
    assert r["training"]["reproduced_at_step"] is not None
    assert r["after_fine_tune"]["sentence_ppl"] < r["before"]["sentence_ppl"]
    full = [p for p in r["points"] if p["ratio"] == 1.0][0]
    assert full["reproduced"] and full["sentence_ppl"] == pytest.approx(r["after_fine_tune"]["sentence_ppl"], rel=1e-3)
    low = [p for p in r["points"] if p["ratio"] == 0.2][0]
    assert low["sentence_ppl"] > full["sentence_ppl"]


def test_bad_input_is_one_clear_error(tiny, tmp_path, capsys):
    assert run_cli(["experiment", "joint-vs-separate", tiny / "model", "--settings", "nope", "--no-eval",
                    "--out", tmp_path / "x"]) == 1
    assert "unknown setting" in capsys.readouterr().err
    assert run_cli(["watermark", tiny / "model", "--sentence", "too short", "--prompt-words", 3,
                    "--text-file", tiny / "text.txt", "--no-eval", "--out", tmp_path / "y"]) == 1
    assert "--prompt-words" in capsys.readouterr().err
    assert not (tmp_path / "y" / "watermark.json").exists()
    # (was a case of tests/bad_inputs.py while watermark was a `jointrank` subcommand)
    assert run_cli(["watermark", tiny / "model", "--sentence", "", "--no-eval", "--out", tmp_path / "z"]) == 1
    assert "needs more words" in capsys.readouterr().err
    assert not (tmp_path / "z" / "watermark.json").exists()


@needs_matplotlib
def test_report_regenerates_from_json(tiny, tmp_path):
    from research.experiments import report

    out = tmp_path / "results"
    assert run_cli(["experiment", "spectra", tiny / "model", "--out", out / "experiments" / "spectra"]) == 0
    path = report.write(out)
    text = path.read_text()
    spectra = read(out / "experiments" / "spectra" / "spectra.json")
    assert spectra["meta"]["command"] in text
    assert f"{spectra['summary']['qk_angles']['8']['mean_cos_over_layers']:.4g}" in text
    assert "not run" in text  # experiments without results say so
    assert "What the scale study says" not in text  # no results/scale.json: nothing claimed
    line = "* paper (svd, data-free), 10%: the paper's 98.8% retention holds (beyond 2 SE) on none of the 3 models"
    (out / "scale.json").write_text(json.dumps({"verdict": [line]}))
    assert line in report.write(out).read_text()  # copied from the scale study, not retyped


@needs_matplotlib
def test_activations_command(tiny, tmp_path):
    assert run_cli(["experiment", "activations", tiny / "model", "--text-file", tiny / "text.txt", "--tokens", 32,
                    "--ratios", "1,0.5", "--out", tmp_path]) == 0
    r = read(tmp_path / "activations.json")
    full = [x for x in r["rows"] if x["ratio"] == 1.0]
    assert full and all(x["weight_rel_error"] < 1e-4 and x["activation_rel_error"] < 1e-4 for x in full)
    half = [x for x in r["rows"] if x["ratio"] == 0.5]
    assert all(x["activation_rel_error"] > 1e-3 for x in half)


def test_zero_shot_differences_are_paired_when_per_document_scores_exist():
    from research.experiments.report import _delta_se

    dense = {"acc": 0.5, "acc_stderr": 0.05, "per_doc": {"acc": "1100" * 25}}
    comp = {"acc": 0.52, "acc_stderr": 0.05, "per_doc": {"acc": "1110" + "1100" * 24}}  # one document flipped
    d = [0, 0, 1, 0] + [0] * 96
    mean = sum(d) / 100
    assert _delta_se(dense, comp) == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 99 / 100))
    del comp["per_doc"]
    assert _delta_se(dense, comp) == pytest.approx(math.hypot(0.05, 0.05))  # no scores per document: unpaired


def test_retention_is_called_chance_level_only_within_two_se_of_guessing():
    from research.experiments.report import _zero_shot_retention

    def entry(acc):  # 400 documents of a two-choice task scored with accuracy ACC
        ones = round(400 * acc)
        return {"acc": acc, "acc_stderr": 0.025, "per_doc": {"acc": [1] * ones + [0] * (400 - ones)}}

    dense = {"piqa": entry(0.75)}
    assert "this is chance level" in _zero_shot_retention(dense, {"piqa": entry(0.51)}, ["piqa"])
    assert "this is above chance" in _zero_shot_retention(dense, {"piqa": entry(0.70)}, ["piqa"])
    assert "retention 93.33%" in _zero_shot_retention(dense, {"piqa": entry(0.70)}, ["piqa"])


# ---------------------------------------------------------------------------------------------------------------
# research/common.py: the helpers experiments and benches share.


def test_mean_se_is_the_standard_error_of_the_mean():
    from research.common import mean_se

    values = [1.0, 2.0, 4.0, 7.0]
    mean, se = mean_se(values)
    assert mean == 3.5
    sample_var = sum((v - 3.5) ** 2 for v in values) / 3
    assert math.isclose(se, math.sqrt(sample_var / 4))
    assert math.isnan(mean_se([2.0])[1])  # one value: no spread to estimate


def test_write_json_is_atomic_and_keeps_each_files_layout(tmp_path):
    from research.common import write_json

    from jointrank.evaluate.report import write_json as package_write_json

    payload = {"b": [1, 2], "a": {"x": 0.5}}
    ours = write_json(tmp_path / "sub" / "ours.json", payload)
    package_write_json(payload, tmp_path / "theirs.json")
    assert ours.read_bytes() == (tmp_path / "theirs.json").read_bytes()  # the benches' layout: indent 2 + newline
    experiment = common.write_json(tmp_path / "e.json", {"t": torch.tensor([1.0, 2.0]), "p": tmp_path})
    assert experiment.read_text() == json.dumps({"t": [1.0, 2.0], "p": str(tmp_path)}, indent=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "sub", "theirs.json"]  # no temporary left
    assert oct(ours.stat().st_mode & 0o777) == "0o644"


def test_quality_bench_compares_on_bos_windows_only_when_both_sides_have_them():
    """results/quality.md's comparisons: on the windows started with BOS when both points were measured so, else on
    the standard windows; the best row is ranked on one protocol only (a row measured without BOS never outranks
    one measured with it by a number from the other protocol)."""
    from research.bench.quality import BOS, NO_BOS, best_by_nll, nll_key, paired_nll, ppl_ratio

    def point(row, plain, bos=None):
        out = {"row": row, "perplexity": {NO_BOS: plain}}
        if bos is not None:
            out["perplexity"][BOS] = bos
        return out

    dense = point("dense", [3.0, 3.2], [2.0, 2.2])
    a = point("a", [3.1, 3.3], [2.5, 2.5])  # better without BOS, worse with it
    b = point("b", [3.5, 3.5], [2.3, 2.3])
    old = point("old", [1.0, 1.0])  # measured only without BOS: lowest number, other protocol
    assert nll_key(a, dense) == BOS and nll_key(old, dense) == NO_BOS
    assert paired_nll(a, dense) == pytest.approx((0.4, 0.1))
    assert ppl_ratio(old, dense)[0] == pytest.approx(math.exp(-2.1))
    assert best_by_nll([a, b, old])["row"] == "b"
    assert best_by_nll([old, point("old2", [0.5, 0.5])])["row"] == "old2"


def test_twin_verdicts_are_decided_on_bos_windows_when_any_pair_has_them():
    """A loss-aware row against its global twin: a pair compared on BOS windows decides over a pair compared only
    without BOS, even when the latter shows the larger win; without any BOS pair, the BOS-less one stands in."""
    from research.bench.quality import BOS, NO_BOS, best_against_twin

    def point(plain, bos=None):
        return {"perplexity": {NO_BOS: plain, **({BOS: bos} if bos is not None else {})}}

    by = {("llm_rom/c4/none", 0.2): point([3.0, 3.2, 3.1], [2.0, 2.2, 2.1]),
          ("loss-llm_rom/c4/none", 0.2): point([2.9, 3.0, 3.0], [1.9, 2.1, 2.1]),
          ("llm_rom/self/refit+distill", 0.2): point([3.0, 3.0, 3.0]),
          ("loss-llm_rom/self/refit+distill", 0.2): point([2.0, 2.1, 2.0])}
    z, row, windows = best_against_twin(by, 0.2, "loss-")
    assert (row, windows) == ("loss-llm_rom/c4/none", "windows with BOS") and z < 0
    del by[("loss-llm_rom/c4/none", 0.2)]
    assert best_against_twin(by, 0.2, "loss-")[1:] == ("loss-llm_rom/self/refit+distill", "windows without BOS")
    assert best_against_twin(by, 0.3, "loss-") is None


def test_quality_bos_keeps_bos_windows_only_from_a_rebuild_that_scores_the_old_windows_as_recorded(tmp_path,
                                                                                                     monkeypatch):
    """quality.py bos: a rebuilt point's BOS windows are added when it scores every recorded window within 1e-3
    nats, and refused (the record untouched) when it does not or has another parameter count."""
    import argparse

    from research.bench import quality as Q

    def point(budget, nll, params=100):
        return {"row": "svd_llm/self/none", "budget": budget, "params_decoder_after": params,
                "perplexity": {"per_window_nll": nll, "windows": [0, 1], "perplexity": math.exp(sum(nll) / 2)}}

    recorded = {0.1: point(0.1, [3.0, 3.2]), 0.2: point(0.2, [4.0, 4.2]), 0.3: point(0.3, [5.0, 5.2])}
    rebuilt = {0.1: point(0.1, [3.0004, 3.2]), 0.2: point(0.2, [4.0, 4.25]), 0.3: point(0.3, [5.0, 5.2], params=90)}
    for p in rebuilt.values():
        p["perplexity"].update(per_window_nll_bos=[2.0, 2.1], perplexity_bos=math.exp(2.05))
    monkeypatch.setattr(Q, "P", Q.Protocol(results=tmp_path / "q.json"))
    (tmp_path / "q.json").write_text(json.dumps({"points": list(recorded.values())}))
    monkeypatch.setattr(Q, "run_point", lambda name, budget, **kw: json.loads(json.dumps(rebuilt[budget])))
    args = argparse.Namespace(only="svd_llm/self/none", budgets="0.1,0.2,0.3", dense=False, max_minutes=60,
                              fresh_cache=False)
    assert Q.cmd_bos(args) == 0
    saved = {p["budget"]: p["perplexity"] for p in json.loads((tmp_path / "q.json").read_text())["points"]}
    assert saved[0.1]["per_window_nll_bos"] == [2.0, 2.1] and saved[0.1]["per_window_nll"] == [3.0, 3.2]
    assert saved[0.1]["bos_added"]["max_abs_diff_nll_rebuilt"] == pytest.approx(4e-4)
    assert "per_window_nll_bos" not in saved[0.2] and "per_window_nll_bos" not in saved[0.3]


@pytest.mark.parametrize("row,budget", [("svd_llm/self/distill-lr3e-5", 0.1), ("loss-svd_llm/self/none", 0.1),
                                        ("loss-llm_rom/self/distill32-lr3e-5", 0.2), ("xl2down-svd_llm/c4/refit", 0.3),
                                        ("llm_rom/self/refit+distill", 0.2)])
def test_compress_flags_of_a_quality_row_build_its_config_calibration_and_healing(row, budget):
    """README quotes these flags for the rows it reports: parsed by the CLI, they are the row the bench built."""
    from jointrank.cli import _calibration_request, _heal_settings, build_parser, config_from_args
    from research.bench import quality as Q

    args = build_parser().parse_args(["compress", "gemma-3-270m", *Q.compress_flags(row, budget), "--out", "x"])
    structure, calibration, heal = Q.parse_row(row)
    assert config_from_args(args) == Q.config_for(structure, budget)
    request = _calibration_request(args)
    assert request.token_count() == Q.CAL_TOKENS
    assert request.text == ("self" if calibration == "self" else str(Q.C4_FILE))
    kind, lr, steps = Q.heal_recipe(heal)
    assert args.heal == kind
    settings = _heal_settings(args)
    if "distill" in kind:
        assert (settings.steps, settings.lr) == (steps, lr)


def test_readme_first_command_builds_the_row_its_table_calls_the_demo():
    """README's quick start runs the setting its quality table reports first, "(the demo)": same config, text and
    healing, so the numbers beside it are the command's."""
    import shlex
    from pathlib import Path

    from jointrank.cli import _calibration_request, _heal_settings, build_parser, config_from_args
    from research.bench import quality as Q
    from research.bench import quality_report as R

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("python3 -m venv"))
    args = build_parser().parse_args(shlex.split(line.split("&& jointrank ", 1)[1]))
    (row, budget), demo = R.README_ROWS[0], R.readme_table({"points": [], "settings": {}})
    assert "| (the demo) |" in next(ln for ln in demo if ln.startswith(f"| {budget:.0%} |"))
    structure, calibration, heal = Q.parse_row(row)
    assert args.func.__name__ == "cmd_compress" and args.model == "gemma-3-270m"
    assert config_from_args(args) == Q.config_for(structure, budget)
    request = _calibration_request(args)
    assert (request.text, request.token_count()) == (calibration, Q.CAL_TOKENS)
    kind, lr, steps = Q.heal_recipe(heal)
    assert args.heal == kind and (_heal_settings(args).steps, _heal_settings(args).lr) == (steps, lr)


def test_readme_table_is_regenerated_between_its_markers_only(tmp_path):
    from research.bench import quality_report as R

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{R.README_START}\nold table\n{R.README_END}\noutro\n")
    results = {"points": [], "settings": {}}
    assert R.write_readme_table(results, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{R.README_END}\noutro\n") and "old table" not in text
    assert text.count("not measured yet") == 4 * len(R.README_ROWS)
    assert R.write_readme_table(results, readme) and readme.read_text() == text  # idempotent
    (tmp_path / "other.md").write_text("no markers\n")
    assert not R.write_readme_table(results, tmp_path / "other.md")
    assert (tmp_path / "other.md").read_text() == "no markers\n"


def test_points_on_self_generated_text_sampled_before_the_loop_guards_are_marked():
    """Rows calibrated on self-generated text that record no sampling details (self_text) were built from text
    `--calibration self` no longer samples: the README table and the scale study mark them, and only them."""
    from research.bench import quality_report as R

    assert R.sampled_before_guards({"row": "svd_llm/self/distill-lr3e-5"})
    assert not R.sampled_before_guards({"row": "svd_llm/self/distill-lr3e-5", "self_text": {"loop_windows": 0}})
    assert not R.sampled_before_guards({"row": "svd_llm/c4/distill-lr3e-5"})
    (row, budget), (other, other_budget) = R.README_ROWS[:2]
    assert "/self/" in row and "/self/" in other
    point = {"row": row, "budget": budget, "perplexity": {}}
    table = "\n".join(R.readme_table({"points": [point], "settings": {}}))
    assert f"`{row}` †" in table and R.PRE_GUARDS in table
    point["self_text"] = {"loop_windows": 0}
    table = "\n".join(R.readme_table({"points": [point], "settings": {}}))
    assert "†" not in table and R.PRE_GUARDS not in table


def test_quantize_bench_leaves_out_points_of_an_earlier_low_rank_row():
    from research.bench import quantize as Qz

    row = Qz.SETTINGS["lr10+int8"][0]
    points = [{"name": "int8", "row": None, "scheme": "int8", "perplexity": {}},
              {"name": "lr10+int8", "row": row, "scheme": "int8", "perplexity": {}},
              {"name": "lr10+int8+qat", "row": "svd_llm/self/refit", "scheme": "int8", "quantized_steps": Qz.QAT_STEPS,
               "perplexity": {}},
              {"name": "lr10+int4", "row": row, "scheme": "int4", "quantized_steps": 5, "perplexity": {}},
              {"name": "gone", "row": None, "scheme": "int2", "perplexity": {}}]
    assert sorted(Qz.current_points({"points": points})) == ["int8", "lr10+int8"]
    assert [p["name"] for p in points if Qz.is_stale(p)] == ["lr10+int8+qat", "lr10+int4", "gone"]


def test_quantize_bench_zeroshot_run_measures_only_points_without_it_and_never_dense_twice(monkeypatch):
    """`run --zeroshot` measures again the points lacking zero-shot, but not dense while results/quality.json holds
    dense's zero-shot (the same model, tasks and documents)."""
    import argparse

    from research.bench import quantize as Qz

    row = Qz.SETTINGS["lr10+int8"][0]
    stored = {"points": [{"name": "dense", "row": None, "scheme": None, "perplexity": {}},
                         {"name": "int8", "row": None, "scheme": "int8", "perplexity": {}, "zeroshot": {}},
                         {"name": "lr10+int8", "row": row, "scheme": "int8", "perplexity": {}}]}
    measured = []
    monkeypatch.setattr(Qz, "load_results", lambda: stored)
    monkeypatch.setattr(Qz, "save", lambda results: None)
    monkeypatch.setattr(Qz, "run_point", lambda name, zeroshot=False: measured.append((name, zeroshot)) or {
        "name": name, "error": "not run in a test"})
    args = argparse.Namespace(only="int8,lr10+int8", max_minutes=60.0, zeroshot=True, bos=False)
    monkeypatch.setattr(Qz, "quality_dense", lambda: {"row": "dense", "zeroshot": {}})
    assert Qz.cmd_run(args) == 0 and measured == [("lr10+int8", True)]
    measured.clear()
    monkeypatch.setattr(Qz, "quality_dense", lambda: None)  # no dense zero-shot anywhere: dense is measured too
    stored["points"] = stored["points"][:2] + [{"name": "lr10+int8", "row": row, "scheme": "int8", "perplexity": {}}]
    assert Qz.cmd_run(args) == 0 and measured == [("dense", True), ("lr10+int8", True)]


def test_quantize_target_needs_one_low_rank_point_beating_every_quantisation_alone_point():
    """Met only by a point that dominates each quantisation-alone point (no more bytes and lower NLL beyond 2 paired
    SE, or fewer bytes and NLL not higher beyond 2 SE); otherwise the nearest pair at no more bytes is named."""
    from research.bench import quantize as Qz

    row = Qz.SETTINGS["lr10+int8"][0]

    def point(name, mib, nll, low_rank=True):
        windows = [nll + 0.01 * ((i * round(mib)) % 5) for i in range(8)]  # paired differences that vary
        return {"name": name, "row": row if low_rank else None, "scheme": "int8",
                "perplexity": {"per_window_nll": windows, "per_window_nll_bos": windows},
                "bytes_on_disk": {"dense linear layers": mib * 2**20}}

    alone = [point("int8", 96, 3.0, False), point("int4", 54, 3.4, False)]
    beats_one = point("lr10+int8", 50, 3.3)  # beats int4 (fewer bytes, lower NLL), not int8 (whose NLL is lower)
    got = Qz.targets({"points": alone + [beats_one]})[0]
    assert not got["met"] and got["measured"].startswith("lr10+int8: beats 1 of 2 (int4)")
    got = Qz.targets({"points": alone + [point("lr10+int8", 50, 2.9)]})[0]
    assert got["met"] and got["measured"].startswith("lr10+int8: beats 2 of 2")
    got = Qz.targets({"points": alone + [point("lr10+int8", 90, 3.5)]})[0]
    assert not got["met"] and got["measured"].startswith("none of 1 low-rank + quantised settings beats any of the 2")
    assert "nearest at no more bytes: lr10+int8 against int8, dNLL +0.4" in got["measured"]  # 3.5 - 3.0, noise


def test_quantize_report_before_any_point_lists_every_setting_as_not_measured(tmp_path, monkeypatch):
    from research.bench import quantize as Qz

    monkeypatch.setattr(Qz, "OUT_MD", tmp_path / "quantize.md")
    monkeypatch.setattr(Qz, "OUT_PNG", tmp_path / "quantize.png")
    Qz.write_report({"points": []})
    assert f"Not measured yet: {', '.join(Qz.SETTINGS)}." in (tmp_path / "quantize.md").read_text()
    assert "## The quality/bytes frontier" not in (tmp_path / "quantize.md").read_text()


def test_heal_probe_names_its_best_recipe_without_user_data_apart_from_user_text():
    """A recipe distilled on user text (here WikiText-2 validation) never stands as the best no-user-data recipe."""
    from research.experiments.heal_zeroshot import POSITIONS, best_on_bos

    def point(*bucket_nll):
        return {"nll_by_position_bos": [list(bucket_nll), [x + 0.1 for x in bucket_nll]]}

    results = {POSITIONS: {"dense": point(2.0, 2.0, 2.0), "0": point(3.0, 3.0, 3.0)},
               "lr3e-5": {"100": point(2.6, 2.5, 2.5)}, "wikivalid-lr3e-5": {"100": point(2.2, 2.1, 2.1)}}
    lines = [x for x in best_on_bos(results) if x]
    assert lines[0].startswith("Lowest perplexity on the windows started with BOS, without user data: lr3e-5 ")
    assert lines[1].startswith("Lowest perplexity on the windows started with BOS, distilled on user text: wikivalid")
    del results["wikivalid-lr3e-5"]
    assert len([x for x in best_on_bos(results) if x]) == 1


def test_scale_targets_judge_retention_at_ten_percent_and_carry_the_decode_target():
    from research.bench import scale

    data = {"points": [
        {"model": "a", "setting": "s", "budget": 0.10, "retention": 0.99, "retention_se": 0.02},
        {"model": "b", "setting": "s", "budget": 0.10, "retention": 0.95, "retention_se": 0.02},
        {"model": "c", "setting": "s", "budget": 0.10},  # not measured yet: no verdict of success
        {"model": "a", "setting": "s", "budget": 0.20, "retention": 0.90, "retention_se": 0.02}]}
    speed = {"targets": [{"dtype": "bfloat16", "model": "joint@20%", "target": "decode >= 1.15x dense",
                          "value": 0.98, "met": False},
                         {"dtype": "bfloat16", "model": "joint@20%", "target": "prefill >= 1.00x dense",
                          "value": 1.2, "met": True}]}
    got = scale.targets(data, speed)
    assert [(t["measured"], t["met"]) for t in got] == [(0.99, True), (0.95, False), (None, False), (0.98, False)]
    assert all({"name", "measured", "target", "met"} <= set(t) for t in got)


@pytest.mark.parametrize("arch,prior", [("gemma3_text", "residual"), ("llama", "flat"), ("qwen2", "flat")])
def test_best_free_takes_the_residual_prior_only_where_the_model_has_post_block_norms(arch, prior):
    from conftest import tiny_model
    from jointrank import plan_for
    from research.bench.quality import config_for_model

    model = tiny_model(arch)
    config, changed = config_for_model("best-free", 0.2, model)
    assert config.allocation_prior == prior and (changed is None) == (prior == "residual")
    plan = plan_for(model, config)  # the residual prior would raise on llama and qwen2
    assert 1 - plan.params_decoder_after / plan.params_decoder_before == pytest.approx(0.2, abs=0.02)
    assert config_for_model("best-free", 0.1, model)[1] is None


@pytest.mark.parametrize("structure", ["paper", "best-free"])
def test_the_papers_ten_percent_structure_gives_way_to_its_twenty_percent_one_where_it_cannot_reach_the_budget(
        structure):
    from conftest import tiny_model
    from jointrank import JointRankError, plan_for
    from research.bench.quality import config_for, config_for_model

    # grouped-query attention beside a wide MLP (Qwen2.5-Coder's shape): Q and K hold too little to remove 10%
    model = tiny_model("llama", intermediate_size=1024, num_key_value_heads=1)
    with pytest.raises(JointRankError, match="cannot remove 10.0%"):
        plan_for(model, config_for(structure, 0.1))
    config, changed = config_for_model(structure, 0.1, model)
    assert "structure (the 10% one cannot remove 10% of this decoder)" in changed
    assert config.rules == config_for(structure, 0.2).rules and config.target == 0.1
    plan = plan_for(model, config)
    assert 1 - plan.params_decoder_after / plan.params_decoder_before == pytest.approx(0.1, abs=0.01)
    assert config_for_model(structure, 0.1, tiny_model("llama"))[1] is None  # reachable: the paper's own


def test_scale_extrapolation_solves_a_power_law_for_the_papers_loss_and_says_when_it_cannot():
    from research.bench import scale

    models = {"a": {"params_total": 10**8}, "b": {"params_total": 10**9}, "c": {"params_total": 10**10},
              "d": {"params_total": None}}
    # loss = 0.24 * (N / 1e8)^-0.5 exactly: 24% at 1e8, 7.6% at 1e9, 2.4% at 1e10; 1.2% at 4e10
    pts = [{"model": m, "retention": 1 - 0.24 * (models[m]["params_total"] / 1e8) ** -0.5, "retention_se": 0.01}
           for m in "abc"]
    text = scale.extrapolation({"models": models}, pts)
    assert "loss ∝ N^-0.50" in text and "about 4e+10 parameters" in text
    at_llama = 0.24 * (scale.PAPER_MODEL_PARAMS / 1e8) ** -0.5  # the fit read at LLaMA-7B's size
    assert f"predicts a loss of {at_llama:.1%}" in text
    unsized = {"model": "d", "retention": 0.9, "retention_se": 0.01}  # no parameter count: not fitted
    assert "before 3 models" in scale.extrapolation({"models": models}, pts[:2] + [unsized])
    rising = [dict(p, retention=1 - 0.01 * i) for i, p in enumerate(pts, 1)]
    assert "does not fall with size" in scale.extrapolation({"models": models}, rising)
    assert "lost nothing" in scale.extrapolation({"models": models}, pts[:2] + [dict(pts[2], retention=1.01)])
    # the same fit on the share of accuracy above chance, when asked for
    above = [{"model": p["model"], "above_chance": p["retention"], "above_chance_se": 0.01} for p in pts]
    text = scale.extrapolation({"models": models}, above, "above_chance")
    assert "loss of the share above chance ∝ N^-0.50" in text and "about 4e+10 parameters" in text


def test_scale_above_chance_is_zero_for_guessing_and_one_for_dense():
    from research.bench import scale
    from research.common import CHANCE

    chance = sum(CHANCE[t] for t in scale.ZS_TASKS) / len(scale.ZS_TASKS)
    dense = {"zeroshot": {"avg": 0.5}}
    assert scale.above_chance((1.0, 0.02), dense) == pytest.approx((1.0, 0.02 * 0.5 / (0.5 - chance)))
    assert scale.above_chance((chance / 0.5, 0.02), dense)[0] == pytest.approx(0.0, abs=1e-12)
    kept, _ = scale.above_chance((0.9, 0.02), dense)  # 10% of the accuracy lost is far more of what beats guessing
    assert kept == pytest.approx((0.45 - chance) / (0.5 - chance)) and kept < 0.9


def test_scale_report_shows_a_failed_point_with_its_error_instead_of_failing(monkeypatch, tmp_path):
    import json

    from research.bench import scale

    dense = {"row": "dense", "budget": 0.0, "perplexity": {"perplexity": 20.0, "per_window_nll": [3.0, 3.0],
                                                            "windows": [0, 1], "seconds": 10.0}}
    failed = {"row": "paper/none/none", "budget": 0.1, "error": "Traceback ...\nJointRankError: cannot remove 10.0%"}
    (tmp_path / "m.json").write_text(json.dumps({"points": [dense, failed]}))
    monkeypatch.setattr(scale, "MODELS", {"m": ([], tmp_path / "m.json")})
    rec = next(p for p in scale.collect()["points"] if p["row"] == "paper/none/none" and p["budget"] == 0.1)
    assert rec["error"] == "JointRankError: cannot remove 10.0%" and "ppl_ratio" not in rec


def test_scale_run_measures_only_the_settings_asked_for_and_refuses_unknown_ones(monkeypatch):
    from research.bench import scale

    calls = []
    monkeypatch.setattr(scale.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert scale.main(["run", "--models", "smollm2-135m", "--settings", "paper,free"]) == 0
    # the dense baseline first (perplexity, then zero-shot), then the points asked for
    assert [c[c.index("--results") + 2:c.index("--only") + 2] for c in calls[:2]] == [
        ["run", "--only", ""], ["zeroshot", "--dense", "--only", ""]]
    asked = {(c[c.index("--budgets") + 1], c[c.index("--only") + 1]) for c in calls[2:]}
    assert asked == {("0.1", "paper/none/none,best-free/none/none"), ("0.2", "paper/none/none,best-free/none/none")}
    assert {c[c.index("--model") + 1] for c in calls} == {"smollm2-135m"}
    calls.clear()
    with pytest.raises(SystemExit, match="unknown setting 'best': one of paper, free, self, c4"):
        scale.main(["run", "--settings", "paper,best"])
    for bad in ("0.3", "ten"):
        with pytest.raises(SystemExit, match="a comma-separated choice of 0.1, 0.2"):
            scale.main(["run", "--budgets", bad])
    assert calls == []  # refused before anything ran
    assert scale.main(["run", "--models", "smollm2-135m", "--settings", "self", "--budgets", "0.1"]) == 0
    assert {(c[c.index("--budgets") + 1], c[c.index("--only") + 1]) for c in calls[2:]} == {
        ("0.1", "loss-svd_llm/self/distill-lr3e-5")}


def test_speed_bench_layouts_are_timed_on_the_same_model_and_put_back_exactly(tokens):
    import torch
    import torch.nn as nn

    from conftest import tiny_model
    from jointrank import compress_
    from jointrank.modules import LowRankLinear
    from jointrank.plan import GroupRule, JointRankConfig
    from research.bench.inference_speed import layout, targets

    model = tiny_model("llama")
    compress_(model, JointRankConfig(rules={"gate_up": GroupRule("joint")}, ratio=0.5), progress=False)
    factors = [m.out.weight for m in model.modules() if isinstance(m, LowRankLinear)]
    dense = [m.weight for m in model.model.layers.modules() if isinstance(m, nn.Linear)
             and all(m.weight is not f for f in factors)]
    column = lambda w: w.stride() == (1, w.shape[0])  # noqa: E731
    with torch.no_grad():
        before = model(tokens).logits
        with layout(model, "row"):
            assert not any(column(w) for w in factors)
        assert all(column(w) for w in factors) and not any(column(w) for w in dense)
        with layout(model, "column"):
            assert all(column(w) for w in dense + factors)
        assert all(column(w) for w in factors) and not any(column(w) for w in dense)
        assert torch.equal(model(tokens).logits, before)
        for dtype, held_column in ((torch.bfloat16, True), (torch.float16, False)):  # float16: not measured
            model.to(dtype)
            assert all(column(w) == held_column for w in factors)
            values = [w.clone() for w in factors]
            with layout(model, "row"):
                assert not any(column(w) for w in factors)
                assert all(torch.equal(w, v) for w, v in zip(factors, values))  # same values, other memory order
            assert all(column(w) == held_column for w in factors)
            assert all(torch.equal(w, v) for w, v in zip(factors, values))
    # the decode target is also judged against dense given the same layout, so the layout is not credited to
    # compression
    results = {"params": {"dense": {"params_total": 10}, "joint@20%": {"params_total": 8}},
               "ratios": {"float32": {"dense": {"decode": 1.0, "prefill_b1": 1.0},
                                      "dense column-major": {"decode": 1.2},
                                      "joint@20%": {"decode": 1.5, "prefill_b1": 1.3},
                                      "joint@20% row-major": {"decode": 1.1}}}}
    got = {t["target"]: t for t in targets(results)}
    assert got["decode >= 1.15x dense"]["measured"] == 1.5 and got["decode >= 1.15x dense"]["met"]
    fair = got["decode >= 1.15x dense, same layout"]
    assert fair["measured"] == pytest.approx(1.25) and fair["met"] and len(got) == 3  # + prefill; no row-major entry


def test_a_decode_target_counts_the_lower_of_the_ratio_of_medians_and_the_paired_median():
    """bfloat16 decode on our CPU jumps between two speeds from one repeat to the next: a ratio of two medians can
    then meet a target the paired per-repeat ratios do not, and the target is met only when both readings meet it."""
    from research.bench.inference_speed import ratios, targets

    def timed(seconds):
        return {"decode_seconds": seconds, "decode_tokens_per_s": 32 / statistics.median(seconds),
                "prefill_tokens_per_s": {"1": 1.0}, "weight_bytes": 1.0}

    dense, compressed = [5.3, 5.5, 6.9, 6.5, 6.4], [5.7, 5.1, 5.1, 6.0, 5.2]
    results = {"timing": {"bfloat16": {"dense": timed(dense), "joint@20%": timed(compressed)}}, "memory": {},
               "params": {"dense": {"params_total": 10}, "joint@20%": {"params_total": 8}}}
    results["ratios"] = ratios(results)
    r = results["ratios"]["bfloat16"]["joint@20%"]
    paired = statistics.median(d / c for d, c in zip(dense, compressed))
    assert r["decode"] == pytest.approx(6.4 / 5.2) and r["decode"] >= 1.15
    assert r["decode_paired"] == pytest.approx(paired) and paired < 1.15
    (decode,) = [t for t in targets(results) if t["target"] == "decode >= 1.15x dense"]
    assert decode["measured"] == pytest.approx(paired) and not decode["met"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])  # the real models' families
def test_interleaved_decode_continues_each_model_greedily_and_times_them_apart(arch):
    """The decode target's reading steps two models one token at a time with their own KV caches: each must
    produce its own greedy continuation, as a forward over the whole sequence finds it (a cache mixed up between
    them, or a position off by one, would not), and the ratio must come out of each model's own steps (a model
    slowed by 20 ms a step reads as the slower one)."""
    import inspect
    import time

    import torch.nn as nn

    from conftest import tiny_model
    from jointrank import compress_
    from jointrank.plan import GroupRule, JointRankConfig
    from research.bench.inference_speed import decode_interleaved, targets

    dense = tiny_model(arch).eval()
    other = tiny_model(arch, seed=1).eval()  # other weights: the two continuations differ; low-rank modules too
    compress_(other, JointRankConfig(rules={"gate_up": GroupRule("joint")}, ratio=0.3), progress=False)

    class Slowed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            time.sleep(0.02)
            return self.inner(**kw)

        forward.__signature__ = inspect.signature(type(dense).forward)  # the keywords the model takes

    # 14 + 6 tokens: past gemma3_text's 16-token sliding window, so its cache's window is stepped through too
    prompt = torch.randint(0, dense.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = decode_interleaved({"dense": Slowed(dense), "joint@20%": other}, prompt, 6, rounds=3)
        for name, m in (("dense", dense), ("joint@20%", other)):  # greedy by definition: no cache
            ids = prompt
            for _ in range(6):
                ids = torch.cat([ids, m(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
            assert got["tokens"][name] == ids[0, prompt.shape[1]:].tolist()
    assert got["tokens"]["dense"] != got["tokens"]["joint@20%"]  # two models, so the check above tells them apart
    assert got["steps_per_round"] == 5 and len(got["round_ratios"]) == 3 and len(got["seconds"]["dense"]) == 3
    assert got["ratio"] > 1 and got["step_ratio"] > 1
    assert all(d >= 5 * 0.02 for d in got["seconds"]["dense"])
    # where measured, it is the decode target's reading, even against the repeats' readings
    results = {"params": {"dense": {"params_total": 10}, "joint@20%": {"params_total": 8}},
               "ratios": {"bfloat16": {"dense": {"decode": 1.0, "prefill_b1": 1.0},
                                       "joint@20%": {"decode": 1.3, "decode_paired": 1.1, "decode_interleaved": 1.2,
                                                     "prefill_b1": 1.3}}}}
    (decode,) = [t for t in targets(results) if t["target"] == "decode >= 1.15x dense"]
    assert decode["measured"] == 1.2 and decode["met"]


def test_decode_profile_counts_every_decoder_matmul_weight_once_and_times_inside_the_layers():
    import torch.nn as nn

    from conftest import tiny_model
    from jointrank import compress_
    from jointrank.architectures import decoder_layers
    from jointrank.modules import LowRankLinear, SharedBasis
    from jointrank.plan import GroupRule, JointRankConfig
    from research.bench.inference_speed import decode_shares, linear_kinds

    model = tiny_model("llama")
    compress_(model, JointRankConfig(rules={"qk": GroupRule("joint"), "gate_up": GroupRule("joint"),
                                            "v": GroupRule("separate")}, ratio=0.5), progress=False)
    _, layers = decoder_layers(model)
    matmul_params = {id(p): p.nbytes for m in layers.modules() if isinstance(m, (nn.Linear, SharedBasis))
                     for p in m.parameters(recurse=False)}
    kinds = linear_kinds(layers)
    assert set(kinds) == {"dense linear", "low-rank"}
    assert sum(b for v in kinds.values() for _, b in v) == sum(matmul_params.values())  # each weight once
    assert len(kinds["low-rank"]) == sum(isinstance(m, LowRankLinear) for m in layers.modules())
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    shares = decode_shares(model.eval(), prompt, 4)
    inside = sum(k["seconds"] for k in shares["kinds"].values())
    assert 0 < inside <= shares["layers_s"] <= shares["total_s"]


def test_inference_bench_times_prefill_of_the_row_major_variant_and_decode_only_of_the_unshared_one():
    import argparse

    from conftest import tiny_model
    from jointrank import compress_
    from jointrank.plan import GroupRule, JointRankConfig
    from research.bench.inference_speed import time_all

    dense = tiny_model("llama").eval()
    joint = tiny_model("llama").eval()
    compress_(joint, JointRankConfig(rules={"gate_up": GroupRule("joint")}, ratio=0.5), progress=False)
    args = argparse.Namespace(structures=["joint"], reductions=[0.2], prefill_batches=[1], prefill_len=8,
                              decode_tokens=3, repeats=1, interleaved_rounds=2)
    got = time_all({"dense": dense, "joint@20%": joint}, args, "float32", lambda *a: None)
    timed = {name: set(t["prefill_tokens_per_s"]) for name, t in got.items()}
    # the layout variant's prefill answers whether column-major factors slow prefill; sharing is a decode matter
    assert timed == {"dense": {"1"}, "joint@20%": {"1"}, "joint@20% row-major": {"1"}, "joint@20% unshared": set(),
                     "dense column-major": set()}
    # both layouts of the 20% model are paired step by step with dense (which layout decodes faster), nothing else
    paired = {name for name, t in got.items() if t["decode_interleaved"]}
    assert paired == {"joint@20%", "joint@20% row-major"}
    assert all(len(got[n]["decode_interleaved"]["round_ratios"]) == 2 for n in paired)


def test_scale_per_task_table_marks_tasks_dense_guesses_on_and_averages_each_row():
    from research.bench import scale
    from research.bench.quality import ZS_TASKS
    from research.common import CHANCE

    dense = {t: CHANCE[t] + 0.2 for t in ZS_TASKS} | {"boolq": 0.45}  # boolq below its 50% chance
    point = {t: CHANCE[t] + 0.1 for t in ZS_TASKS} | {"boolq": 0.65}
    data = {"models": {"m": {"dense_task_acc": dense, "dense_zeroshot": sum(dense.values()) / len(dense)}},
            "points": [{"model": "m", "setting": "s", "budget": 0.1, "task_acc": point,
                        "self_text_before_guards": True},
                       {"model": "m", "setting": "s", "budget": 0.2}]}  # no zero-shot: no row
    rows = [line for line in scale.per_task_tables(data) if line.startswith(("| dense ", "| s "))]
    cells = [row.strip("| ").split(" | ") for row in rows]
    assert len(rows) == 2 and cells[1][0] == "s †" and cells[1][1] == "10%"
    boolq = 2 + ZS_TASKS.index("boolq")
    assert [i for i, c in enumerate(cells[0]) if "(chance)" in c] == [boolq] and cells[1][boolq] == "65.0"
    assert float(cells[1][-1]) == pytest.approx(100 * sum(point.values()) / len(point), abs=0.05)


def test_scale_compute_needed_scales_healing_by_the_probed_step_time_and_counts_what_it_cannot_estimate():
    from research.bench import scale

    ref = scale.REFERENCE_MODEL
    models = {ref: {"dense_zeroshot": 0.5, "minutes": {"data-free": [2.0, 30.0], "healed": [20.0, 15.0]}},
              "big": {"dense_zeroshot": None, "minutes": {"data-free": [10.0, 40.0], "healed": [None, None]}}}
    points = [{"model": "big", "row": "paper/none/none", "budget": 0.1},  # not built: build + zero-shot
              {"model": "big", "row": "paper/none/none", "budget": 0.2, "ppl_ratio": 2.0},  # zero-shot only
              {"model": "big", "row": "loss-svd_llm/self/distill-lr3e-5", "budget": 0.1},  # healed, none measured
              {"model": ref, "row": "loss-svd_llm/c4/distill-lr3e-5", "budget": 0.1},  # healed, measured there
              {"model": ref, "row": "paper/none/none", "budget": 0.1, "ppl_ratio": 2.0, "retention": 0.9}]  # done
    data = {"models": models, "points": points}
    probe = {ref: {"seconds_per_step": 5.0, "distill_peak_rss_gib": 3.0},
             "big": {"seconds_per_step": 15.0, "distill_peak_rss_gib": 20.0}}
    got = {c["model"]: c for c in scale.compute_needed(data, probe)}
    assert got[ref]["minutes"] == pytest.approx(20.0 + 30.0) and got[ref]["points"] == 1
    # dense zero-shot 40 + (10 + 40) + 40 + healed: 10 + (20 - 2) x (15 / 5) + 40
    assert got["big"]["minutes"] == pytest.approx(40 + 50 + 40 + 10 + 18 * 3 + 40)
    assert got["big"]["not_estimated"] == 0 and "x3.0" in got["big"]["how"][0]
    assert got["big"]["distill_peak_rss_gib"] == 20.0
    unprobed = {c["model"]: c for c in scale.compute_needed(data, {})}["big"]
    assert unprobed["not_estimated"] == 1 and unprobed["minutes"] == pytest.approx(40 + 50 + 40)
    assert scale.is_healed("loss-llm_rom/c4/distill-lr3e-5") and not scale.is_healed("best-free/none/none")


def test_heal_probe_refuses_an_unknown_model_and_too_few_steps_before_loading_anything(monkeypatch):
    from research.bench import heal_probe

    monkeypatch.setattr(heal_probe.subprocess, "run", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit, match="unknown model 'llama-7b': one of gemma-3-270m"):
        heal_probe.main(["--models", "gemma-3-270m,llama-7b"])
    with pytest.raises(SystemExit, match="--steps must be at least 2"):
        heal_probe.main(["--models", "gemma-3-270m", "--steps", "1"])


def test_scale_chance_verdict_separates_guessing_models_from_the_others():
    from research.bench import scale

    paper = next(iter(scale.SETTINGS))
    pts = [{"model": "a", "setting": paper, "budget": 0.1, "above_chance": 0.05, "above_chance_se": 0.1},  # guessing
           {"model": "b", "setting": paper, "budget": 0.1, "above_chance": 0.7, "above_chance_se": 0.06},
           {"model": "a", "setting": paper, "budget": 0.2, "above_chance": -0.1, "above_chance_se": 0.1},
           {"model": "b", "setting": "best data-free", "budget": 0.2, "above_chance": 0.5, "above_chance_se": 0.1}]
    ten, twenty = scale.chance_verdict({"points": pts})
    assert "chance level (the share above guessing kept within 2 SE of 0) on a; above chance on b (70% ± 6)" in ten
    assert "does not hold on every model" in ten
    assert "on a; above chance on none." in twenty  # another setting's point is not the paper's


def test_scale_healing_gain_over_the_paper_is_paired_per_document():
    """zs_gain: the retention one compressed model keeps beyond another, with the SE of the per-document difference
    (documents both get right or both miss add nothing to it); healing_verdict reads it per model, saying when the
    gain is within 2 SE of 0."""
    from research.bench import scale

    def zs(docs):  # the same per-document accuracies on every task
        return {"zeroshot": {"avg": sum(docs) / len(docs), "per_doc": {t: docs for t in scale.ZS_TASKS}}}

    dense, paper = zs([1, 1, 1, 1, 0, 0, 1, 1]), zs([1, 0, 1, 0, 0, 0, 1, 0])
    healed = zs([1, 1, 1, 0, 0, 0, 1, 0])  # one more document right than the paper's, none fewer
    gain, se = scale.zs_gain(healed, paper, dense)
    assert gain == pytest.approx((4 / 8 - 3 / 8) / (6 / 8))
    diffs = [1, 0, 0, 0, 0, 0, 0, 0]
    one_task = statistics.stdev(diffs) / math.sqrt(len(diffs))
    assert se == pytest.approx(math.sqrt(len(scale.ZS_TASKS) * one_task**2) / len(scale.ZS_TASKS) / (6 / 8))
    assert scale.zs_gain(paper, paper, dense) == (0.0, 0.0)
    # over a subset of tasks: only those tasks' accuracies and documents count
    tasks = list(scale.ZS_TASKS)
    worse = {"zeroshot": {"avg": None, "acc": {t: 0.0 if t == tasks[0] else 4 / 8 for t in tasks},
                          "per_doc": {t: [0] * 8 if t == tasks[0] else [1, 1, 1, 0, 0, 0, 1, 0] for t in tasks}}}
    for r, docs in ((dense, [1, 1, 1, 1, 0, 0, 1, 1]), (paper, [1, 0, 1, 0, 0, 0, 1, 0])):
        r["zeroshot"]["acc"] = {t: sum(docs) / 8 for t in tasks}
    sub_gain, sub_se = scale.zs_gain(worse, paper, dense, tasks[1:])
    assert sub_gain == pytest.approx(gain) and sub_se == pytest.approx(
        math.sqrt(len(tasks[1:]) * one_task**2) / len(tasks[1:]) / (6 / 8))
    assert scale.zs_gain(healed, {"zeroshot": None}, dense) is None

    healed_label = next(s for s, rows in scale.SETTINGS.items() if scale.is_healed(rows[0.1]))
    pts = [{"model": "a", "setting": scale.PAPER, "budget": 0.1, "ppl_ratio": 9.5, "ppl_windows_bos": True},
           {"model": "a", "setting": healed_label, "budget": 0.1, "ppl_ratio": 1.2, "ppl_windows_bos": True,
            "gain_over_paper": 0.053, "gain_over_paper_se": 0.031},
           {"model": "b", "setting": scale.PAPER, "budget": 0.1, "ppl_ratio": 4.0, "ppl_windows_bos": False},
           {"model": "b", "setting": healed_label, "budget": 0.1, "ppl_ratio": 1.1, "ppl_windows_bos": True,
            "gain_over_paper": 0.2, "gain_over_paper_se": 0.03}]
    pts[3].update(gain_over_text_before_guards=0.013, gain_over_text_before_guards_se=0.017,
                  ppl_ratio_text_before_guards=1.79, tasks_dense_at_chance=["boolq"],
                  gain_over_paper_above_chance_tasks=0.017, gain_over_paper_above_chance_tasks_se=0.026)
    (line,) = scale.healing_verdict({"points": pts})
    assert "a +5.3 ± 3.1 (within 2 SE of 0) (perplexity / dense 9.50x → 1.20x);" in line
    assert ("b +20.0 ± 3.0 (perplexity / dense 4.00x without BOS → 1.10x) (without boolq, where dense scores no "
            "better than chance: +1.7 ± 2.6) (rebuilt on text sampled with the loop guards: +1.3 ± 1.7 points against "
            "the same row on the text sampled before them, at 1.79x") in line
    # against the best data-free build: its own gains, and the loop-guard rebuild (a paper-line remark) left out
    free_label = scale.SETTING_KEYS["free"]
    pts += [{"model": "b", "setting": free_label, "budget": 0.1, "ppl_ratio": 3.0, "ppl_windows_bos": True}]
    pts[3].update(gain_over_free=-0.005, gain_over_free_se=0.025)
    (line,) = scale.healing_verdict({"points": pts}, "free")
    assert line.startswith(f"* {healed_label}, 10%, against the best data-free build at the same budget: b -0.5 ± 2.5 "
                           "(within 2 SE of 0) (perplexity / dense 3.00x → 1.10x): points of dense zero-shot accuracy "
                           "kept beyond the best data-free build")
    assert "model a" not in line and "a +" not in line and "loop guards" not in line


def test_scale_collect_reads_each_healed_point_against_the_paper_and_the_best_data_free_build(monkeypatch, tmp_path):
    import json

    from research.bench import scale

    def point(row, budget, docs):
        return {"row": row, "budget": budget, "decoder_reduction": budget,
                "perplexity": {"perplexity": 20.0, "per_window_nll": [3.0, 3.1], "windows": [0, 1], "seconds": 1.0},
                "zeroshot": {"avg": sum(docs) / len(docs), "acc": {t: sum(docs) / len(docs) for t in scale.ZS_TASKS},
                             "per_doc": {t: docs for t in scale.ZS_TASKS}, "seconds": 1.0}}

    healed_row = next(rows[0.1] for rows in scale.SETTINGS.values() if scale.is_healed(rows[0.1]))
    dense, free = point("dense", 0.0, [1, 1, 1, 1, 0, 1]), point("best-free/none/none", 0.1, [1, 0, 0, 1, 0, 0])
    healed = point(healed_row, 0.1, [1, 1, 0, 1, 0, 0])
    (tmp_path / "m.json").write_text(json.dumps({"points": [dense, free, healed]}))
    monkeypatch.setattr(scale, "MODELS", {"m": ([], tmp_path / "m.json")})
    rec = next(p for p in scale.collect()["points"] if p["row"] == healed_row and p["budget"] == 0.1)
    assert (rec["gain_over_free"], rec["gain_over_free_se"]) == scale.zs_gain(healed, free, dense)
    assert rec["gain_over_free"] == pytest.approx(1 / 6 / (5 / 6))
    assert "gain_over_paper" not in rec  # no paper point measured on this model


def test_quality_keeps_a_points_distillation_state_until_the_point_is_measured(tmp_path, monkeypatch):
    """A point stopped mid-distillation continues from its saved state; once measured, the state is deleted (a later
    rebuild distils from the start, as a first build does). States are per model, row, budget and code."""
    import subprocess

    from research.bench import quality as Q

    monkeypatch.setattr(Q, "CACHE", tmp_path)
    monkeypatch.setattr(Q, "P", Q.Protocol(model="m", results=tmp_path / "q.json"))
    row = "loss-svd_llm/self/distill-lr3e-5"
    state = Q.heal_state_dir(row, 0.1)
    assert len({state, Q.heal_state_dir(row, 0.2), Q.heal_state_dir("svd_llm/self/distill-lr3e-5", 0.1)}) == 3
    assert Q.code_digest() in state.name and state.parent.name == "m"
    state.mkdir(parents=True)
    killed = subprocess.CompletedProcess([], -9, stdout="", stderr="Killed")
    monkeypatch.setattr(Q.subprocess, "run", lambda *a, **k: killed)
    assert "error" in Q.run_point(row, 0.1, zeroshot=False) and state.is_dir()  # kept: the rerun continues there
    done = subprocess.CompletedProcess([], 0, stdout='POINT {"row": "%s", "budget": 0.1}\n' % row, stderr="")
    monkeypatch.setattr(Q.subprocess, "run", lambda *a, **k: done)
    assert Q.run_point(row, 0.1, zeroshot=False)["row"] == row and not state.exists()


def test_quality_resumes_a_stopped_healed_point_after_compression_with_the_model_an_unstopped_build_makes(
        tmp_path, monkeypatch, model_dir):
    """A healed point keeps its compressed model, calibration windows and teacher states before it distils: a point
    stopped during healing (a session's end) resumes there without planning or compressing again, and distils to
    exactly the model an unstopped build makes. Its facts keep the stopped run's compression time."""
    import shutil

    import jointrank.heal
    from research.bench import quality as Q

    monkeypatch.setattr(Q, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(Q, "P", Q.Protocol(model=str(model_dir), results=tmp_path / "q.json"))
    monkeypatch.setattr(Q, "CAL_TOKENS", 128)
    monkeypatch.setitem(Q.HEAL_RECIPES, "distill-lr3e-5", ("distill", 3e-5, 3))
    row = "loss-svd_llm/self/distill-lr3e-5"
    unstopped, _, facts = Q.build(row, 0.3)
    assert "resumed_after_compress" not in facts and len(facts["heal"]["distill"]["losses"]) == 3
    shutil.rmtree(Q.heal_state_dir(row, 0.3))  # as run_point does once a point is measured

    real_heal = jointrank.heal.heal_

    def session_ends(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jointrank.heal, "heal_", session_ends)
    with pytest.raises(KeyboardInterrupt):
        Q.build(row, 0.3)
    monkeypatch.setattr(jointrank.heal, "heal_", real_heal)

    def compress_again(*args, **kwargs):
        raise AssertionError("the resumed point planned and compressed again")

    monkeypatch.setattr(Q, "compress_stage", compress_again)
    resumed, _, again = Q.build(row, 0.3)
    assert again["resumed_after_compress"] is True
    assert again["heal"]["distill"]["losses"] == facts["heal"]["distill"]["losses"]
    for (name, a), (_, b) in zip(unstopped.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert again["compress_seconds"] < again["build_wall_seconds"]


def test_quality_zeroshot_rebuild_stops_at_the_first_distillation_step_that_leaves_the_measured_losses(tmp_path,
                                                                                                        monkeypatch,
                                                                                                        capsys):
    """A zero-shot rebuild follows the measured build's distillation losses and stops (exit 4, one line saying why)
    at the first step that differs: a model that cannot be the measured one costs one step, not a whole distillation
    and evaluation. The point's record is left as it was."""
    import argparse

    from research.bench import quality as Q

    check = Q.follow_losses([0.5, 0.4, 0.3])
    check(1, 0.5)
    check(2, 0.4)
    with pytest.raises(Q.NotTheMeasuredModel, match="step 3: loss 0.30001"):
        check(3, 0.30001)
    with pytest.raises(Q.NotTheMeasuredModel, match="stopped after 3"):
        check(4, 0.2)

    # the point command passes the losses it is given to build and turns a divergence into exit 4
    seen = {}

    def diverging_build(name, budget, expect_losses=None, **kw):
        seen["expect"] = expect_losses
        Q.follow_losses(expect_losses)(1, 9.9)

    monkeypatch.setattr(Q, "build", diverging_build)
    (tmp_path / "losses.json").write_text("[0.5, 0.4]")
    args = argparse.Namespace(name="svd_llm/self/distill", budget="0.1", progress=False, fresh_cache=False,
                              expect_losses=str(tmp_path / "losses.json"), perplexity=False, zeroshot=True)
    assert Q.cmd_point(args) == 4 and seen["expect"] == [0.5, 0.4]
    assert "not the measured model: distillation step 1: loss 9.9" in capsys.readouterr().err

    # zeroshot hands each point's recorded losses to its rebuild, and a failed rebuild records nothing
    recorded = {"row": "svd_llm/self/distill", "budget": 0.1, "params_decoder_after": 100,
                "perplexity": {"perplexity": 2.0}, "heal": {"distill": {"losses": [0.5, 0.4]}}}
    monkeypatch.setattr(Q, "P", Q.Protocol(results=tmp_path / "q.json"))
    (tmp_path / "q.json").write_text(json.dumps({"points": [recorded]}))
    asked = []
    monkeypatch.setattr(Q, "run_point", lambda name, budget, **kw: asked.append(kw) or
                        {"row": name, "budget": budget, "error": "not the measured model"})
    zs_args = argparse.Namespace(only="svd_llm/self/distill", budgets="0.1", dense=False, max_minutes=60,
                                 fresh_cache=False)
    assert Q.cmd_zeroshot(zs_args) == 0
    assert asked[0]["expect_losses"] == [0.5, 0.4] and asked[0]["zeroshot"] is True
    assert json.loads((tmp_path / "q.json").read_text())["points"] == [recorded]


def test_selfgen_repetition_share_is_zero_for_text_that_never_repeats_and_near_one_for_a_loop():
    from jointrank.methods.selfgen import repeated_ngram_share

    assert repeated_ngram_share(list(range(100))) == 0.0
    loop = [7, 8, 9] * 40  # 117 4-grams, only the first 3 new
    assert repeated_ngram_share(loop) == pytest.approx(114 / 117)
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)


def test_quality_timings_say_when_healing_resumed_and_show_sampling_only_for_self_generated_calibration():
    """A point stopped during distillation and resumed times only the steps after the saved state: its line must
    say so, or a reader takes a partial time for a build's cost; C4 calibration samples nothing to time."""
    from research.bench.quality_report import _timing_section

    run = {"compress_heal_seconds": 790.0, "compress_seconds": 348.0, "heal_seconds": 443.0,
           "peak_rss_gib_compress": 3.6, "other_cpu_seconds": 189.0}
    by = {("loss-svd_llm/c4/distill-lr3e-5", 0.1): {**run, "heal_resumed_from_step": 25},
          ("loss-svd_llm/self/distill-lr3e-5", 0.1): {**run, "sampling_seconds": 120.0, "sampling_from_cache": True}}
    c4, self_ = [ln for ln in _timing_section(by, 0.1) if ln.startswith("* ")]
    assert "resumed at step 25" in c4 and "sampling" not in c4
    assert "resumed" not in self_ and "sampling 120 s, sampling time from when the cache was made" in self_


def test_scale_compares_self_generated_with_c4_calibration_model_by_model():
    from research.bench import scale

    self_label = scale.SETTING_KEYS["self"]
    pts = [{"model": "a", "setting": self_label, "budget": 0.1, "nll_vs_c4": -0.05, "nll_vs_c4_se": 0.01,
            "nll_vs_c4_bos": True, "zs_vs_c4": -0.005, "zs_vs_c4_se": 0.014},
           {"model": "b", "setting": self_label, "budget": 0.1, "nll_vs_c4": 0.3, "nll_vs_c4_se": 0.02,
            "nll_vs_c4_bos": True, "zs_vs_c4": -0.05, "zs_vs_c4_se": 0.01},
           {"model": "c", "setting": self_label, "budget": 0.1, "nll_vs_c4": 0.01, "nll_vs_c4_se": 0.01,
            "nll_vs_c4_bos": False},
           {"model": "d", "setting": self_label, "budget": 0.2}]  # no C4 point to compare with
    (line,) = scale.calibration_verdict({"points": pts})  # a line per budget with a comparison: 10% only
    assert line.startswith("* self-generated against C4 calibration, 10%") and " d " not in line

    def about(model):
        (one,) = scale.calibration_verdict({"points": [p for p in pts if p["model"] == model]})
        return one

    assert "a -0.050 ± 0.010 nats per token (self-generated better" in about("a")
    assert "zero-shot -0.5 ± 1.4 points (within 2 SE of 0)" in about("a")
    assert "b +0.300 ± 0.020 nats per token (C4 better" in about("b")
    assert "zero-shot -5.0 ± 1.0 points" in about("b") and "within 2 SE of 0" not in about("b")
    assert "(within 2 SE;" in about("c") and "windows without BOS" in about("c") and "zero-shot -" not in about("c")


def test_scale_states_what_a_decoder_budget_is_of_each_whole_model():
    from research.bench import scale

    data = {"models": {"small": {"params_decoder": 37, "params_total": 100},
                       "big": {"params_decoder": 74, "params_total": 100},
                       "unmeasured": {"params_decoder": None, "params_total": None}}}
    ten, twenty = scale.share_verdict(data)
    assert ten.startswith("* 10% of the decoder is 3.7% of small's parameters, 7.4% of big's parameters:")
    assert twenty.startswith("* 20% of the decoder is 7.4% of small's parameters, 14.8% of big's parameters:")
    assert "unmeasured" not in ten + twenty
