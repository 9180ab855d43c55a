"""Perplexity on WikiText-2 (raw, test) and C4-style web text, by the standard protocol.

Protocol (the one GPTQ / SparseGPT / SVD-LLM papers use, so numbers are comparable): join the rows with "\\n\\n",
tokenise the whole text once (the tokenizer's default special tokens, i.e. one BOS at the very start for Gemma and
Llama), cut it into non-overlapping windows of ``seqlen`` tokens, drop the incomplete tail, and report
exp(mean token NLL) over every predicted token (seqlen - 1 per window; with equal windows this is exactly the papers'
``exp(sum(loss_i * seqlen) / (n * seqlen))``).

That protocol starts every window but the first mid-text, without BOS. Gemma needs its BOS (its first position is
an attention sink): without it the first few dozen positions of a window score far worse than with it, and a
compressed or healed model can differ from dense there in ways that say nothing about text it would really see
(results/heal_zeroshot.md measures it). ``window_bos=True`` scores the same windows as [BOS] + their first
seqlen - 1 tokens, which is how a model sees text in use; the two are paired window by window.

Works on any causal LM module: dense, compressed in memory, or reloaded. When the model exposes its decoder and
output projection we never materialise the full [tokens x vocab] logits (262k columns for Gemma): the decoder's
hidden states are projected and scored ``loss_chunk`` positions at a time.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..errors import JointRankError
from . import data as data_mod
from .tasks import PERPLEXITY_TASKS


def load_text(name: str, data_dir) -> str:
    """The evaluation text for NAME, from the data dir or (online, wikitext2 only) the hub."""
    if data_dir is None and name == "wikitext2":
        data_mod.require_hub([name])
        try:
            from datasets import load_dataset

            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as exc:  # no hub: say what would have worked
            raise JointRankError(
                f"wikitext2: no data dir (--data-dir or {data_mod.ENV_VAR}) and the hub failed ({type(exc).__name__})"
            ) from exc
        return "\n\n".join(rows)
    if name == "wikitext2":
        return "\n\n".join(data_mod.wikitext2_rows(data_dir))
    if name == "c4":
        return "\n\n".join(data_mod.c4_documents(data_dir))
    raise JointRankError(f"unknown perplexity text {name}; known: {', '.join(PERPLEXITY_TASKS)}")


def make_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                 bos_id: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of a 1-D id tensor; the incomplete tail is dropped. With `bos_id`, each
    window is that token followed by the window's first seqlen - 1 tokens (the same windows, each starting as a
    document does)."""
    if seqlen < 2:
        raise JointRankError(f"--seqlen must be at least 2, got {seqlen}")
    n = token_ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise JointRankError(f"--max-windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise JointRankError(f"text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = token_ids[: n * seqlen].view(n, seqlen)
    return windows if bos_id is None else start_with_bos(windows, bos_id)


def start_with_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """The same [n, seqlen] windows, each as `bos_id` followed by its first seqlen - 1 tokens."""
    bos = torch.full((windows.shape[0], 1), bos_id, dtype=windows.dtype, device=windows.device)
    return torch.cat([bos, windows[:, :-1]], dim=1)


def split_model(model):
    """(decoder, head, softcap) when the model can be run without full logits, else None."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head, getattr(model.config, "final_logit_softcapping", None)


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 style final-logit soft-capping (softcap from split_model), as in the model's own forward; every
    path that runs the LM head itself (perplexity, zero-shot, distillation, loss sensitivity) applies it here."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, loss_chunk: int = 512) -> tuple[float, int]:
    """Sum of next-token NLL (float64) and number of predicted tokens over a [b, seqlen] batch of windows."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    targets = windows[:, 1:]
    parts = split_model(model)
    if parts is None:  # an arbitrary causal LM: full logits, still scored in float32
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return float(nll.double()), targets.numel()
    decoder, head, softcap = parts
    hidden = decoder(input_ids=windows, use_cache=False).last_hidden_state[:, :-1]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, hidden.shape[1], loss_chunk):
        h = hidden[:, start: start + loss_chunk]
        logits = soft_cap(head(h).float(), softcap)
        y = targets[:, start: start + loss_chunk]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").double().cpu()
    return float(total), targets.numel()


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
    window_bos: bool = False,
) -> dict:
    """Perplexity of MODEL on TEXT by the standard protocol; returns the numbers and what was measured.
    `window_bos`: every window starts with the tokenizer's BOS (see the module docstring); refused for a tokenizer
    without one."""
    from tqdm.auto import tqdm

    if tokenizer is None:
        raise JointRankError("perplexity needs a tokenizer, and the model came without one")
    started = time.perf_counter()
    bos_id = None
    if window_bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise JointRankError("windows starting with BOS were asked for, but the tokenizer has no BOS token")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = make_windows(ids, seqlen, max_windows, bos_id)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress):
            s, c = window_nll(model, windows[start: start + batch_size])
            nll, count = nll + s, count + c
    finally:
        model.train(was_training)
    mean = nll / count
    return {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "seqlen": seqlen,
        "window_bos": bos_id is not None,
        "windows": len(windows),
        "windows_available": ids.numel() // seqlen,
        "tokens_in_text": ids.numel(),
        "predicted_tokens": count,
        "wall_time_s": time.perf_counter() - started,
    }
