"""Calibration for the data-aware methods: text -> token windows -> per-unit input statistics, layer by layer.

The decoder is run one layer at a time on the calibration windows (GPTQ's scheme, IST-DASLab/gptq): the inputs of
layer 0 are captured once, then for each layer its linear inputs are accumulated into running-mean second moments in
float64, the layer's units are compressed, and the layer is run again to produce the next layer's inputs — on the
compressed layer when the method is sequential (LLM-ROM), on the dense one otherwise (ASVD, SVD-LLM). Only one
layer's activations are held at a time and the LM head is never run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..architectures import decoder_layers
from ..errors import JointRankError

DEFAULT_TOKENS = 16384
DEFAULT_SEQLEN = 512


class InputStats:
    """Running statistics of one unit's input x (d_in): E[x xᵀ] and E|x_j|, accumulated in float64.

    Each batch's product xᵀx is formed where x lives (a GPU user's activations never cross to the CPU), in float32
    unless x is float64: on a CPU a float64 product is the slower one (results/stats_precision.md: 1.3x at 8960 wide
    to 2.4x at 640 wide per 512-token batch), and float32 rounding, ~1e-7 of the product's scale, is far below the
    damping every consumer adds (SVD-LLM 1e-2, LLM-ROM 1e-8 of the mean diagonal, raised until the factorisation
    succeeds); research/bench/stats_precision.py measures both, the time and the factors' output error either way."""

    def __init__(self, d_in: int):
        self.second_moment = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.mean_abs = torch.zeros(d_in, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        m = x.shape[0]
        if m == 0:
            return
        x = x if x.dtype == torch.float64 else x.float()
        product = (x.T @ x).to(device="cpu", dtype=torch.float64)
        abs_sum = x.abs().sum(0).to(device="cpu", dtype=torch.float64)
        total = self.tokens + m
        # running mean: old mean re-weighted, new batch added; never a sum that grows with the token count
        self.second_moment.mul_(self.tokens / total).add_(product, alpha=1.0 / total)
        self.mean_abs.mul_(self.tokens / total).add_(abs_sum, alpha=1.0 / total)
        self.tokens = total

    def to(self, device) -> "InputStats":
        """A copy on `device` (where a unit's weights are factorised)."""
        moved = InputStats.__new__(InputStats)
        moved.second_moment, moved.mean_abs = self.second_moment.to(device), self.mean_abs.to(device)
        moved.tokens = self.tokens
        return moved


def pooled(stats: list[InputStats]) -> InputStats:
    """One InputStats over the tokens of several: a cross-layer unit's inputs from each of its layers, weighted by
    their token counts (the second moment the stacked, shared basis is whitened with)."""
    if len(stats) == 1:
        return stats[0]
    out = InputStats(stats[0].second_moment.shape[0])
    for s in stats:
        total = out.tokens + s.tokens
        if total == 0:
            continue
        out.second_moment.mul_(out.tokens / total).add_(s.second_moment, alpha=s.tokens / total)
        out.mean_abs.mul_(out.tokens / total).add_(s.mean_abs, alpha=s.tokens / total)
        out.tokens = total
    return out


@dataclass
class Calibration:
    """Token windows (n, seqlen), each starting with BOS, and where they came from."""

    input_ids: torch.Tensor
    source: str
    seed: int
    provenance: dict | None = None  # how the text was made (self-generated text: sampling settings, cache file)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())


def load_text(path: str | Path, tokenizer, *, tokens: int = DEFAULT_TOKENS, seqlen: int = DEFAULT_SEQLEN,
              seed: int = 0) -> Calibration:
    """`tokens` worth of windows of `seqlen` tokens from a text file of documents (one per line, or blank-line
    separated), documents in a seeded order, concatenated. Each window starts with BOS (Gemma needs it)."""
    path = Path(path)
    if not path.is_file():
        raise JointRankError(f"calibration file {path} does not exist")
    if tokens < 1 or seqlen < 2:
        raise JointRankError(f"--calibration-tokens must be positive (got {tokens})")
    text = path.read_text(encoding="utf-8", errors="replace")
    docs = [d.strip() for d in text.splitlines() if d.strip()]
    if not docs:
        raise JointRankError(f"calibration file {path} holds no text")
    random.Random(seed).shuffle(docs)
    seqlen = min(seqlen, tokens)
    n_windows = -(-tokens // seqlen)
    body = seqlen - 1
    need = n_windows * body
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc + "\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < body:
        raise JointRankError(f"calibration file {path} has only {len(ids)} tokens; need at least {body}")
    n_windows = min(n_windows, len(ids) // body)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = torch.tensor(ids[: n_windows * body], dtype=torch.long).view(n_windows, body)
    windows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.long), windows], dim=1)
    return Calibration(windows, str(path), seed)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering decoder layer 0 for every window, and the keyword arguments every layer is called
    with (masks, rotary embeddings: they differ per layer type, e.g. Gemma's sliding and global layers)."""
    _, layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict | None] = [None] * len(layers)
    state = {"full": True}

    def pre_hook(index):
        def hook(module, args, kw):
            hidden = args[0] if args else kw["hidden_states"]
            if index == 0:
                inputs.append(hidden.detach())
            if kwargs[index] is None:
                kwargs[index] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if not state["full"] or index == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for row in input_ids:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
            state["full"] = False  # the first window went through every layer to record their arguments
    finally:
        for h in handles:
            h.remove()
    return inputs, kwargs


def _output(result):
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def layerwise(model: nn.Module, calibration: Calibration, watch: dict[int, dict[str, str]], on_layer, *,
              sequential: bool) -> None:
    """For each layer i in `watch` ({layer: {stat key: module name}}), accumulate InputStats of the named modules'
    inputs and call on_layer(i, {key: InputStats}), which may replace the layer's modules. Layers are visited in
    order; inputs to the next layer come from the layer after on_layer when `sequential`, before it otherwise."""
    _, layers = decoder_layers(model)
    inputs, kwargs = capture_layer_inputs(model, calibration.input_ids)
    last = max(watch) if watch else -1
    for index, layer in enumerate(layers):
        if index > last:
            break
        names = watch.get(index, {})
        stats = {}
        handles = []
        for key, name in names.items():
            module = model.get_submodule(name)
            stats[key] = InputStats(module.in_features)
            handles.append(module.register_forward_pre_hook(lambda m, args, s=stats[key]: s.add(args[0])))
        try:
            outputs = [_output(layer(x, **kwargs[index])) for x in inputs] if (names or not sequential) else None
        finally:
            for h in handles:
                h.remove()
        if names:
            on_layer(index, stats)
        if sequential or outputs is None:
            outputs = [_output(layer(x, **kwargs[index])) for x in inputs]
        inputs = outputs
