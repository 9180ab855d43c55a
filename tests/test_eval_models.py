"""Perplexity and lm-eval glue on tiny random models with a locally trained tokenizer (nothing downloaded)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jointrank.errors import JointRankError
from jointrank.evaluate import perplexity as P
from conftest import data_dir, needs_data, needs_lm_eval, requires_gemma
from tiny_models import tiny_model

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof.",
    "Question: How do I boil an egg?\nAnswer: Put it in boiling water for nine minutes.",
    "Passage: Ethanol fuel is made from corn.\nQuestion: is ethanol made from corn?\nAnswer: yes no",
] * 3


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here on a few sentences: covers any text, adds BOS like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


# the shape of a tiny model whose vocabulary is the trained tokenizer's, with the special ids it uses
EVAL_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(kind: str, vocab: int, seed: int = 0):
    if kind == "llama":
        return tiny_model("llama", seed, vocab_size=vocab, num_key_value_heads=2, **EVAL_SHAPE)
    # Gemma-3 with final-logit soft-capping switched on, to test that the chunked path applies it
    return tiny_model("gemma3_text", seed, vocab_size=vocab, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                      final_logit_softcapping=5.0, **EVAL_SHAPE)


def reference_mean_nll(model, windows: torch.Tensor) -> float:
    """Hand computation: full logits from the model's own forward, log-softmax, pick the next token, average."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits.double(), dim=-1)
    picked = logp[:, :-1].gather(-1, windows[:, 1:, None]).squeeze(-1)
    return float(-picked.mean())


def hand_windows(tokenizer, seqlen: int):
    """The test text, its ids and its [n, seqlen] windows cut by hand (what make_windows must reproduce)."""
    text = " ".join(CORPUS) * 4
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    return text, ids, ids[: n * seqlen].view(n, seqlen)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_perplexity_equals_hand_computed_mean_nll(tokenizer, kind):
    model = tiny(kind, len(tokenizer))
    seqlen = 16
    text, ids, windows = hand_windows(tokenizer, seqlen)
    n = len(windows)
    expected = reference_mean_nll(model, windows)
    got = P.perplexity(model, tokenizer, text, seqlen=seqlen, batch_size=3, progress=False)
    assert got["windows"] == got["windows_available"] == n
    assert got["predicted_tokens"] == n * (seqlen - 1)
    assert got["mean_nll"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # batching windows and the loss chunk size must not change the number
    one = P.perplexity(model, tokenizer, text, seqlen=seqlen, batch_size=1, progress=False)
    assert one["mean_nll"] == pytest.approx(got["mean_nll"], rel=1e-6)
    s, c = P.window_nll(model, windows[:2], loss_chunk=3)
    assert s / c == pytest.approx(reference_mean_nll(model, windows[:2]), rel=1e-5)


def test_max_windows_takes_the_first_windows(tokenizer):
    model = tiny("llama", len(tokenizer))
    text = " ".join(CORPUS) * 4
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    got = P.perplexity(model, tokenizer, text, seqlen=16, max_windows=2, progress=False)
    assert got["windows"] == 2 and got["windows_available"] > 2
    assert got["mean_nll"] == pytest.approx(reference_mean_nll(model, ids[:32].view(2, 16)), rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_bos_windows_are_the_same_windows_started_with_bos(tokenizer, kind):
    model = tiny(kind, len(tokenizer))
    seqlen = 16
    text, ids, plain = hand_windows(tokenizer, seqlen)
    n = len(plain)
    bos = tokenizer.bos_token_id
    by_hand = [[bos] + row[:-1] for row in plain.tolist()]
    assert P.make_windows(ids, seqlen, bos_id=bos).tolist() == by_hand
    expected = reference_mean_nll(model, torch.tensor(by_hand))
    got = P.perplexity(model, tokenizer, text, seqlen=seqlen, batch_size=2, progress=False, window_bos=True)
    assert got["window_bos"] is True and got["windows"] == n and got["predicted_tokens"] == n * (seqlen - 1)
    assert got["mean_nll"] == pytest.approx(expected, rel=1e-5)
    assert got["mean_nll"] != pytest.approx(P.perplexity(model, tokenizer, text, seqlen=seqlen,
                                                         progress=False)["mean_nll"], rel=1e-4)


def test_bos_windows_need_a_bos_token(tokenizer):
    import types

    no_bos = types.SimpleNamespace(bos_token_id=None)  # refused before the text is tokenised
    with pytest.raises(JointRankError, match="no BOS token"):
        P.perplexity(tiny("llama", len(tokenizer)), no_bos, " ".join(CORPUS) * 4, seqlen=16, progress=False,
                     window_bos=True)


def test_window_errors():
    ids = torch.arange(10)
    with pytest.raises(JointRankError, match="fewer than one window"):
        P.make_windows(ids, 16)
    with pytest.raises(JointRankError, match="seqlen"):
        P.make_windows(ids, 1)
    assert P.make_windows(torch.arange(35), 16).tolist() == [list(range(16)), list(range(16, 32))]


@needs_lm_eval
def test_continuation_only_hflm_scores_like_hflm(tokenizer):
    """Our HFLM subclass skips the vocabulary projection of context positions; scores must be HFLM's."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from jointrank.evaluate.zeroshot import _continuation_only_hflm

    for kind in ("llama", "gemma3"):
        model = tiny(kind, len(tokenizer), seed=3)
        reqs = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate([
            ("Question: How do I boil an egg?\nAnswer:", " Put it in boiling water."),
            ("Question: How do I boil an egg?\nAnswer:", " Put it in the fridge for nine minutes, then eat it."),
            ("A man is sitting on a roof.", " He"),
            ("Passage: Ethanol fuel is made from corn. It is a long passage about fuel.\nQuestion: is it?\nAnswer:", " yes"),
            ("The", " quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."),
        ])]
        ref = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu").loglikelihood(reqs, disable_tqdm=True)
        fast = _continuation_only_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu")
        got = fast.loglikelihood(reqs, disable_tqdm=True)
        for (a, ga), (b, gb) in zip(ref, got):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-5) and ga == gb
        assert fast.batch_size == 3  # restored after the call


@needs_lm_eval
def test_zero_shot_batches_are_cut_to_the_logits_budget_with_the_same_scores(tokenizer):
    """Rows of very different lengths in one batch cost logits for the longest tail (16 GiB on BoolQ with Gemma's
    262k vocabulary): batches are cut where the logits would pass the budget, and no score moves."""
    from lm_eval.api.instance import Instance

    from jointrank.evaluate.zeroshot import _continuation_only_hflm

    model = tiny("llama", len(tokenizer), seed=3)
    long = "Passage: " + " ".join(CORPUS) * 3 + "\nQuestion: is it?\nAnswer:"
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate([
        (long, " yes"), (long, " no"), ("Passage: short.\nAnswer:", " yes"), ("A man is sitting on a roof.", " He"),
        ("The", " quick brown fox"), ("Question: How do I boil an egg?\nAnswer:", " Put it in boiling water."),
    ])]
    shapes = {}
    for budget in (2**40, 1):
        lm = _continuation_only_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
        lm.logits_budget = budget
        calls = []
        inner = lm._model_call
        lm._model_call = lambda inps, **kw: calls.append(inps.shape) or inner(inps, **kw)
        shapes[budget] = (lm.loglikelihood(reqs, disable_tqdm=True), calls)
    (wide, wide_calls), (cut, cut_calls) = shapes[2**40], shapes[1]
    assert len(wide_calls) == 2 and max(c[0] for c in wide_calls) == 4  # batch_size rows, as asked
    assert len(cut_calls) == 5 and all(c[0] == 1 for c in cut_calls)  # one row each (the two "long" share one)
    for (a, ga), (b, gb) in zip(wide, cut):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-5) and ga == gb


@needs_lm_eval
@needs_data
def test_run_tasks_on_local_data_scores_the_seeded_sample(tokenizer):
    """End to end through lm-eval, offline, on a tiny model: the sample size and indices are the requested ones."""
    from jointrank.evaluate import zeroshot

    model = tiny("llama", len(tokenizer))
    out = zeroshot.run_tasks(model, tokenizer, ["piqa", "boolq"], data_dir=data_dir(), limit=4, seed=7, batch_size=4,
                             progress=False)
    for task, n_total in (("piqa", 1838), ("boolq", 3270)):
        r = out[task]
        assert r["n"] == 4 and r["n_total"] == n_total
        assert r["indices"] == zeroshot.sample_indices(task, n_total, 4, 7)
        assert 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] > 0
        assert len(r["per_doc"]["acc"]) == 4 and r["per_doc"]["acc"].count("1") / 4 == pytest.approx(r["acc"])
    assert "acc_norm" in out["piqa"] and "acc_norm" not in out["boolq"]  # the built-in metric lists, unchanged


@pytest.mark.slow
@requires_gemma
def test_gemma_chunked_loss_matches_full_logits():
    """On the real Gemma-3-270M (262k vocabulary), the chunked-head loss equals the model's own full-logits loss."""
    from jointrank.sources import load_model

    model, tokenizer, _ = load_model("gemma-3-270m")
    ids = tokenizer(" ".join(CORPUS) * 3, return_tensors="pt").input_ids[:, :128]
    s, c = P.window_nll(model, ids)
    with torch.no_grad():
        full = F.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:]).item()
    assert s / c == pytest.approx(full, rel=1e-5)
