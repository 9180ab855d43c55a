"""One table of cases: every declared architecture x every decomposition method x every run path, all through the
same checks (in the style of peft's tests/testing_common.py + tests/test_custom_models.py).

Paths:
  memory    compress_ on the loaded model: parameter counts and factor shapes are those of the plan, outputs are
            finite, a data-aware method ran on calibration text and beat plain SVD's output error there;
  streamed  compress_checkpoint on the saved source: the very tensors of the in-memory checkpoint (data-free methods),
            or one clear refusal that writes nothing (data-aware methods need the model in memory);
  reloaded  plain AutoModelForCausalLM.from_pretrained of the saved checkpoint after `import jointrank`: the same
            logits and greedy generation as the compressed model, the plan's parameter count, no dense copy stored.

A new architecture is one entry in tests/tiny_models.py; a new method is one row in METHODS.
The table reaches jointrank only through `Api` below, so renaming an entry point is a one-line change there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import jointrank
from jointrank import GroupRule, JointRankConfig, JointRankError
from jointrank.architectures import ARCHITECTURES, count_parameters
from tiny_models import ARCHS, random_tokens, save_tiny, tiny_tokenizer


class Api:
    """jointrank's public entry points as this table uses them: one line each."""

    @staticmethod
    def config(method: str, share: int = 1):
        return JointRankConfig(rules=RULES, ratio=RATIO, method=method, share_layers=share)

    @staticmethod
    def is_sequential(method: str) -> bool:
        from jointrank import methods

        return methods.parse(method)[0].sequential

    @staticmethod
    def plan(model, config):
        return jointrank.plan_for(model, config)

    @staticmethod
    def compress(model, config, calibration):
        return jointrank.compress_(model, config, progress=False, calibration=calibration)

    @staticmethod
    def save(model, out, result, config):
        return jointrank.save(model, None, out, result, source="tiny", config=config)

    @staticmethod
    def stream(source, out, config):
        from jointrank.stream import StreamOptions, compress_checkpoint

        return compress_checkpoint(source, out, config, options=StreamOptions(progress=False)).result

    @staticmethod
    def reload(path):  # what a user elsewhere does: no jointrank.load, just transformers (jointrank is imported)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path).eval()

    @staticmethod
    def load(path):  # jointrank's own loader (dtype and device options) must agree with plain transformers
        return jointrank.load(path).eval()

    @staticmethod
    def calibration(text_file, tokenizer):
        from jointrank.methods.calibration import load_text

        return load_text(text_file, tokenizer, tokens=CALIBRATION_TOKENS, seqlen=32)

    @staticmethod
    def is_data_aware(method: str) -> bool:
        from jointrank import methods

        return methods.parse(method)[0].needs_calibration

    @staticmethod
    def registered_methods() -> set[str]:
        from jointrank import methods

        return set(methods.available())


# ---------------------------------------------------------------------------------------------------------- the table
METHODS = ("svd", "balanced:heads", "asvd", "svd_llm", "llm_rom")
PATHS = ("memory", "streamed", "reloaded")
# bases per layer, or shared by 2 adjacent layers (the tiny models have 3: layers 0-1 share, layer 2 keeps its own)
SHARES = (1, 2)

# joint and separate units, a layer selector and a kept group (o): every kind of plan entry in one config
RULES = {"qk": GroupRule("joint"), "gate_up": GroupRule("joint"), "v": GroupRule("separate"),
         "down": GroupRule("separate", "last:2")}
RATIO = 0.4
CALIBRATION_TOKENS = 256
CALIBRATION_DOCUMENTS = [  # one per line in the file; load_text shuffles them with its seed and fills the windows
    "the river ran past the old mill, and the miller's daughter counted the boats.",
    "in the first year of the war the city walls were raised by ten feet.",
    "a small black cat slept on the warm stones of the bridge all afternoon.",
    "the king's ships sailed north, past the islands, towards the iron hills.",
    "every morning the baker lit the ovens before the bells rang for the market.",
    "she wrote the letter twice, then burned it, and walked down to the harbour.",
] * 4


@dataclass(frozen=True)
class Case:
    arch: str
    method: str
    path: str
    share: int = 1

    def __str__(self) -> str:
        return f"{self.arch}-{self.method}-{self.path}" + (f"-shared{self.share}" if self.share > 1 else "")


CASES = [Case(arch, method, path, share) for share in SHARES for arch in ARCHS for method in METHODS
         for path in PATHS]


def test_the_table_covers_every_declared_architecture_and_every_registered_method():
    assert set(ARCHS) == set(ARCHITECTURES)
    assert {m.split(":")[0] for m in METHODS} == Api.registered_methods()


# ------------------------------------------------------------------------------ built once per (architecture, method)
@dataclass
class Built:
    source: Path  # the dense model saved as a checkpoint directory
    dense: torch.nn.Module
    model: torch.nn.Module  # compressed in memory
    result: object
    checkpoint: Path  # the compressed model saved
    calibration: object | None


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    text_file = root / "calibration.txt"
    text_file.write_text("\n".join(CALIBRATION_DOCUMENTS) + "\n", encoding="utf-8")

    @cache
    def source(arch: str) -> Path:
        return save_tiny(arch, root / arch / "source")

    @cache
    def built(arch: str, method: str, share: int = 1) -> Built:
        config = Api.config(method, share)
        calibration = Api.calibration(text_file, tiny_tokenizer()) if Api.is_data_aware(method) else None
        dense, model = Api.reload(source(arch)), Api.reload(source(arch))
        result = Api.compress(model, config, calibration)
        checkpoint = Api.save(model, root / arch / f"{method.replace(':', '-')}-{share}", result, config)
        return Built(source(arch), dense, model, result, checkpoint, calibration)

    return built


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ---------------------------------------------------------------------------------------------------- checks by path
def check_memory(case: Case, b: Built) -> None:
    from jointrank.modules import LowRankLinear, SharedBasis

    plan = b.result.plan
    assert plan == Api.plan(b.dense, Api.config(case.method, case.share))  # compress_ followed the model's plan
    assert count_parameters(b.model) == plan.params_total_after == b.result.params_total_after
    assert b.result.params_decoder_after == plan.params_decoder_after < plan.params_decoder_before
    assert len(b.result.units) == len(plan.factorised) > 0
    for entry in plan.factorised:
        for name, d_out in zip(entry.members, entry.d_outs):
            module = b.model.get_submodule(name)
            assert isinstance(module, LowRankLinear), name
            assert tuple(module.basis_weight.shape) == (entry.rank, entry.d_in)
            assert tuple(module.out.weight.shape) == (d_out, entry.rank)
    joint = [e for e in plan.factorised if e.structure == "joint"]
    assert joint and sum(isinstance(m, SharedBasis) for m in b.model.modules()) == len(joint)  # one basis per unit
    # shared by 2 layers: every rule's units of layers 0 and 1 are one unit, layer 2's are per layer as before
    assert {e.span for e in plan.factorised} == ({1, 2} if case.share == 2 else {1})
    for entry in plan.factorised:
        if entry.span > 1:
            bases = {id(b.model.get_submodule(name).shared_basis) for name in entry.members}
            assert len(bases) == 1 and entry.structure == "joint"  # one basis object serves every layer
    tokens = random_tokens()
    after = logits(b.model, tokens)
    assert torch.isfinite(after).all()
    assert not torch.allclose(after, logits(b.dense, tokens), atol=1e-3)  # the ranks really were truncated
    if Api.is_data_aware(case.method):
        check_calibrated(b)


def check_calibrated(b: Built) -> None:
    """The method saw every calibration token at every factorised unit, and lost less of the units' output there
    than plain SVD of the same rank would have (its whole point)."""
    rows = b.result.extra["calibration_errors"]
    assert b.calibration.tokens == CALIBRATION_TOKENS  # the text filled every window
    from jointrank.plan import span_of

    # a unit shared by n layers is whitened with the inputs of all n: n times the tokens, pooled
    assert len(rows) == len(b.result.plan.factorised)
    assert all(r["tokens"] == b.calibration.tokens * span_of(r["members"]) for r in rows)
    ours = sum(r["calib_rel_error"] for r in rows)
    plain = sum(r["svd_calib_rel_error"] for r in rows)
    assert ours < plain


def check_streamed(case: Case, b: Built, out: Path) -> None:
    config = Api.config(case.method, case.share)
    if Api.is_data_aware(case.method):
        with pytest.raises(JointRankError, match="needs calibration data .* in-memory path"):
            Api.stream(b.source, out, config)
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
        return
    result = Api.stream(b.source, out, config)
    expected, streamed = saved_tensors(b.checkpoint), saved_tensors(out)
    assert sorted(streamed) == sorted(expected)
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name
    counts = lambda r: (r.params_total_before, r.params_total_after,  # noqa: E731
                        r.params_decoder_before, r.params_decoder_after)
    assert counts(result) == counts(b.result)
    assert result.plan == b.result.plan


def check_reloaded(case: Case, b: Built) -> None:
    plan = b.result.plan
    tokens = random_tokens()
    expected = logits(b.model, tokens)
    assert torch.isfinite(expected).all()
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = b.model.generate(tokens[:1, :4], **greedy)
    for reloaded in (Api.reload(b.checkpoint), Api.load(b.checkpoint)):
        assert count_parameters(reloaded) == plan.params_total_after
        assert torch.equal(logits(reloaded, tokens), expected)
        assert torch.equal(reloaded.generate(tokens[:1, :4], **greedy), generated)
    stored = saved_tensors(b.checkpoint)
    dense_members = {f"{m}.weight" for e in plan.factorised for m in e.members}
    assert not dense_members & set(stored)  # factors only: no dense copy of a factorised layer is stored
    # every stored tensor is counted, once: a joint unit's shared basis is stored once, not per member
    assert sum(t.numel() for t in stored.values()) == plan.params_total_after
    config = json.loads((b.checkpoint / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "jointrank"  # what makes from_pretrained rebuild it


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(case: Case, build, tmp_path):
    if case.share > 1 and Api.is_sequential(case.method):
        # a sequential method compresses each layer before measuring the next: one clear refusal, on every path
        with pytest.raises(JointRankError, match="--share-layers needs a method .* sequential"):
            build(case.arch, case.method, case.share)
        return
    built = build(case.arch, case.method, case.share)
    if case.path == "memory":
        check_memory(case, built)
    elif case.path == "streamed":
        check_streamed(case, built, tmp_path / "streamed")
    else:
        check_reloaded(case, built)
