"""The one factory for the tests' tiny random models: every architecture jointrank declares, built from a config
(nothing downloaded), small enough that a whole compression takes milliseconds.

Each family keeps the quirk that makes it worth testing, so a test over all of them sees every case the code has to
handle: grouped-query attention (K and V narrower than Q), biases on q/k/v, q/k norms per head (qwen3, gemma3) or over
the whole projection (olmo2), tied embeddings, attention widths that differ from the hidden size, soft-capped logits,
layer norms without weights (olmo). A test that needs another shape passes config fields as overrides.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 96  # token ids for test inputs are drawn below this
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128)

# model_type -> (transformers config class name, the fields that give the family its quirk)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=4)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2)),  # grouped-query attention
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),  # biases on q/k/v
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),  # q/k norms per head; attention 64 wide
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=12)),  # one KV head, tied embeddings
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=12, sliding_window=16,  # soft-capped logits
                                    query_pre_attn_scalar=12)),
    "gemma3_text": ("Gemma3TextConfig", dict(num_key_value_heads=1, head_dim=16, sliding_window=16,  # q/k norms,
                                             query_pre_attn_scalar=16)),  # tied embeddings
    "olmo": ("OlmoConfig", dict(num_key_value_heads=4, eos_token_id=2)),  # layer norms without weights
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2, eos_token_id=2)),  # q/k norms over the whole projection
}
ARCHS = tuple(FAMILIES)


def tiny_config(arch: str, **overrides):
    import transformers

    class_name, quirks = FAMILIES[arch]
    return getattr(transformers, class_name)(**{**COMMON, **quirks, **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A random model of family `arch` in eval mode; the same seed and overrides give the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    with torch.no_grad():  # random biases (zeros at init), so a test can see whether they are kept exactly
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


def save_tiny(arch: str, path: Path, *, dtype=torch.float32, shards: bool = False, seed: int = 0,
              **overrides) -> Path:
    """A tiny model saved as a source checkpoint directory (what a user passes to the CLI or to streaming);
    `shards` splits the weights over several safetensors files."""
    model = tiny_model(arch, seed, **overrides).to(dtype)
    model.save_pretrained(path, max_shard_size="60KB" if shards else "5GB")
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return Path(path)


def random_tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = " \n.,'abcdefghijklmnopqrstuvwxyz"  # with the specials, ids stay below VOCAB


def tiny_tokenizer():
    """A character-level tokenizer whose ids fit every tiny model's vocabulary, for tests that feed real text
    (calibration files, perplexity) without downloading a tokenizer."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *CHARACTERS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def save_with_tokenizer(path: Path, arch: str = "llama") -> Path:
    """A tiny model saved with a real (word-level) tokenizer beside it, so the CLI can sample text from it
    (--calibration self) and read text files with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model(arch).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return Path(path)
