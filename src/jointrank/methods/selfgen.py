"""Calibration text sampled from the dense model itself: data-aware methods and healing with no user data.

LLM-QAT (arXiv 2305.17888) showed that text a model generates calibrates it about as well as real text; here it is
the `--calibration self[:TOKENS]` source. Windows of `seqlen` tokens each start with BOS and continue with tokens
sampled from the model (temperature and nucleus settings below, seeded). When the model emits its end-of-text token
the window goes on with a fresh BOS, i.e. a new document, so windows are always full and the model's own document
length distribution is kept.

Small instruction-tuned models sampled from a bare BOS often fall into loops ("a, a, a, ..."): 22 of 32 windows on
Qwen2.5-Coder-0.5B-Instruct (results/scale/selfgen_repetition.json). A loop teaches healing nothing about language, so
three guards, each in the settings and so in the cache key: every document is sampled as if alone (it cannot copy the
one before it); a document whose last `loop_window` 4-grams are mostly repeats of earlier ones ends there, and a new
one starts, as after an end-of-text token; a window still mostly repetition is drawn again. What they did (restarts,
windows redrawn, windows still mostly repetition) goes into the provenance, and a warning names what is left.

Sampling the same model with the same settings gives the same tokens on the same machine (seeded), so the windows
are cached on disk (safetensors, no pickle) under a key made from the model's weights fingerprint and the settings;
the cache file records its provenance, which goes into the checkpoint's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import cache_keyword
from ..errors import JointRankError
from .calibration import Calibration

DEFAULT_SELF_TOKENS = 16384
SELF_PREFIX = "self"


@dataclass(frozen=True)
class SamplingSettings:
    """How the model is sampled (LLM-QAT samples its model the same way: plain sampling, no prompt)."""

    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    seqlen: int = 512
    batch_size: int = 16  # windows sampled at once
    # sampled in bfloat16 (a temporary copy when the model is float32): 2-3x faster on CPUs and GPUs alike, and the
    # text only has to be typical of the model, not bit-exact (bfloat16 against float32 sampling is not measured yet)
    dtype: str = "bfloat16"
    # each document attends only to itself: an instruction-tuned model that sees earlier documents in its window
    # copies them, and windows fill with the same two-token answer (Qwen2.5-Coder-0.5B: "```<|im_end|>" x 100)
    isolate_documents: bool = True
    # the loop guard: a document ends once at least `loop_share` of its last `loop_window` 4-grams already occurred
    # in it (a loop of period p trips it ~loop_window + p tokens in, so that much loop stays); 0 turns it off
    loop_window: int = 32
    loop_share: float = 0.8
    # a window with more than this share of repeated 4-grams is drawn again, up to `redraw_limit` times as many
    # windows in all (then the least repetitive are kept, with a warning); 1.0 turns it off
    max_repeated_share: float = 0.5
    redraw_limit: float = 3.0

    def cache_key(self) -> dict:
        """The settings that change the sampled tokens. With the isolation, the guard and redrawing off, the key is
        the one written before they existed, so text sampled then is still found in the cache."""
        key = asdict(self)
        if not self.isolate_documents:
            del key["isolate_documents"]
        if not self.loop_window:
            del key["loop_window"], key["loop_share"]
        if self.max_repeated_share >= 1.0:
            del key["max_repeated_share"], key["redraw_limit"]
        return key


def parse_spec(spec: str | None) -> int | None:
    """'self' -> DEFAULT_SELF_TOKENS, 'self:8192' -> 8192, anything else (a file path) -> None."""
    if spec is None:
        return None
    name, sep, tokens = spec.partition(":")
    if name != SELF_PREFIX:
        return None
    if not sep:
        return DEFAULT_SELF_TOKENS
    try:
        value = int(tokens)
    except ValueError:
        raise JointRankError(f"--calibration self:TOKENS needs a whole number of tokens, got {tokens!r}") from None
    if value < 2:
        raise JointRankError(f"--calibration self:TOKENS needs at least 2 tokens, got {value}")
    return value


def default_cache_dir() -> Path:
    root = os.environ.get("JOINTRANK_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "jointrank")
    return Path(root).expanduser() / "selfgen"


@torch.no_grad()
def fingerprint(model) -> str:
    """A short hash of the model's weights (a strided sample of every tensor, plus names and shapes): two models
    with the same fingerprint sample the same text. Cheap (a few ms per tensor), unlike hashing every byte."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"selfgen-{digest}.safetensors"


def self_calibration(model, tokenizer, tokens: int = DEFAULT_SELF_TOKENS, *, settings: SamplingSettings | None = None,
                     cache_dir: str | Path | None = None, progress: bool = True) -> Calibration:
    """`tokens` worth of windows sampled from `model` (dense: call this before compressing it), cached on disk."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    settings = settings or SamplingSettings()
    seqlen = min(settings.seqlen, tokens)
    n_windows = -(-tokens // seqlen)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = {"fingerprint": fingerprint(model), "windows": n_windows, **settings.cache_key(), "seqlen": seqlen,
           "vocab": len(tokenizer)}
    path = _cache_path(cache_dir, key)
    source = f"self:{n_windows * seqlen}"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:  # the tokens and what the guards did, in one read
                ids = f.get_tensor("input_ids")
                meta = json.loads((f.metadata() or {}).get("jointrank_selfgen", "{}"))
        except Exception as exc:  # a truncated or foreign file: regenerate rather than trust it
            print(f"jointrank: ignoring unreadable self-calibration cache {path} ({exc})")
        else:
            if tuple(ids.shape) == (n_windows, seqlen):
                stats = {k: v for k, v in meta.items() if k in GUARD_STATS}  # absent: sampled before the guards
                return Calibration(ids, source, settings.seed,
                                   provenance=_provenance(key, path, cached=True, **_repetition(ids, stats)))
    started = time.perf_counter()
    stats = {}
    ids = sample_windows(model, tokenizer, n_windows, seqlen, settings, progress=progress, stats=stats)
    seconds = time.perf_counter() - started
    quality = _repetition(ids, stats)
    if quality["loop_windows"]:
        print(f"jointrank: {quality['loop_windows']} of {n_windows} self-generated windows are still mostly "
              f"repetition (over {LOOP_SHARE:.0%} of their 4-grams repeated); healing learns little from them")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"input_ids": ids.contiguous()}, str(tmp),
                  metadata={"jointrank_selfgen": json.dumps({**key, "seconds": seconds, **quality})})
        os.replace(tmp, path)  # atomic: a killed run never leaves a cache file that looks complete
    except OSError as exc:  # an unwritable cache costs a regeneration next time, nothing else
        print(f"jointrank: could not cache self-calibration in {cache_dir} ({exc})")
    return Calibration(ids, source, settings.seed,
                       provenance=_provenance(key, path, cached=False, seconds=seconds, **quality))


def _provenance(key: dict, path: Path, *, cached: bool, seconds: float | None = None, **quality) -> dict:
    return {"kind": "self-generated", **key, "cache_file": str(path), "from_cache": cached, **quality,
            **({"sampling_seconds": seconds} if seconds is not None else {})}


LOOP_SHARE = 0.5  # a window with more than this share of repeated 4-grams is reported as a loop


def repeated_ngram_share(ids: list[int], n: int = 4) -> float:
    """The share of a sequence's n-grams that already occurred earlier in it (0: never repeats, near 1: a loop)."""
    seen, repeats = set(), 0
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / max(len(grams), 1)


GUARD_STATS = ("loop_restarts", "windows_redrawn")  # what the guards did, None where a guard was off


def _repetition(ids: torch.Tensor, stats: dict) -> dict:
    """What the provenance says about the text's repetition: windows still mostly repeats, the median share of
    repeated 4-grams, and what the guards did (unknown for text cached before them)."""
    shares = [repeated_ngram_share(w.tolist()) for w in ids]
    return {"loop_windows": sum(s > LOOP_SHARE for s in shares),
            "median_repeated_4gram_share": round(sorted(shares)[len(shares) // 2], 4),
            **{k: stats[k] for k in GUARD_STATS if stats.get(k) is not None}}


@torch.no_grad()
def sample_windows(model, tokenizer, n_windows: int, seqlen: int, settings: SamplingSettings, *,
                   progress: bool = True, stats: dict | None = None) -> torch.Tensor:
    """(n_windows, seqlen) token ids: BOS then sampled tokens, a new BOS after every end-of-text token and after
    every loop the guard stops; windows still mostly repetition drawn again (`stats` gets both counts).

    A plain loop over a KV cache rather than `generate()`: it restarts documents inside a window, samples with a
    generator of its own (so nothing else's use of the global RNG changes the text) and shows one progress bar.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise JointRankError("self-generated calibration needs a tokenizer with a BOS or EOS token")
    eos = {t for t in _as_list(getattr(model.generation_config, "eos_token_id", None)) + [tokenizer.eos_token_id]
           if t is not None}
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    cache_kw = cache_keyword(model)
    was_training = model.training
    model.eval()
    kept, redrawn, restarts = [], [], 0  # redrawn: (share, order drawn, window)
    redraw = settings.max_repeated_share < 1.0
    limit = max(n_windows, int(n_windows * settings.redraw_limit)) if redraw else n_windows
    drawn = 0
    bar = tqdm(total=n_windows * seqlen, desc="sampling calibration text", unit="tok", disable=not progress)
    restore = _to_dtype(model, getattr(torch, settings.dtype))
    try:
        while len(kept) < n_windows and drawn < limit:
            b = min(settings.batch_size, limit - drawn, n_windows - len(kept))
            if drawn >= n_windows:  # a redraw: the bar grows by what is drawn again
                bar.total += b * seqlen
                bar.refresh()
            drawn += b
            ids = torch.full((b, seqlen), bos, dtype=torch.long)
            cache = None
            guards = [LoopGuard(settings.loop_window, settings.loop_share, bos) for _ in range(b)]
            doc_start = torch.zeros(b, dtype=torch.long)  # where each row's current document began
            for t in range(seqlen - 1):
                step_ids = ids[:, t:t + 1].to(device)
                mask = {}
                if settings.isolate_documents:  # each document attends only to itself, as if sampled alone
                    mask["attention_mask"] = (torch.arange(t + 1) >= doc_start[:, None]).long().to(device)
                result = model(input_ids=step_ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache}, **mask)
                cache = getattr(result, cache_kw)
                logits = result.logits[:, -1].float().cpu()
                nxt = _sample(logits, settings.temperature, settings.top_p, generator)
                # a finished document (or a loop) is followed by a new one inside the same window
                looping = [g.push(int(x)) for g, x in zip(guards, ids[:, t])]
                restarts += sum(looping)
                ended = torch.tensor([int(x) in eos or loop for x, loop in zip(ids[:, t], looping)])
                ids[:, t + 1] = torch.where(ended, torch.full_like(nxt, bos), nxt)
                doc_start = torch.where(ids[:, t + 1] == bos, t + 1, doc_start)  # the model's own BOS counts too
                bar.update(b)
            bar.update(b)
            for window in ids:
                share = repeated_ngram_share(window.tolist()) if redraw else 0.0
                if share > settings.max_repeated_share:
                    redrawn.append((share, len(redrawn), window))
                elif len(kept) < n_windows:
                    kept.append(window)
    finally:
        bar.close()
        restore()
        model.train(was_training)
    # the limit reached: the least repetitive of the windows drawn again fill the rest
    kept += [w for _, _, w in sorted(redrawn, key=lambda r: r[:2])[:n_windows - len(kept)]]
    if stats is not None:  # None: that guard was off, nothing counted
        stats["loop_restarts"] = restarts if settings.loop_window else None
        stats["windows_redrawn"] = len(redrawn) if redraw else None
    return torch.stack(kept)


class LoopGuard:
    """Follows one row's current document token by token and says when it has fallen into a loop: at least `share`
    of its last `window` 4-grams occurred earlier in the document. O(1) per token. A BOS starts a new document."""

    def __init__(self, window: int, share: float, bos: int):
        self.window, self.limit, self.bos = window, share * window, bos
        self.restart()

    def restart(self) -> None:
        self.tail, self.seen, self.flags, self.repeats = (), set(), [], 0

    def push(self, token: int) -> bool:
        """Add the document's next token; True means the document should end after it (and the guard restarts)."""
        if not self.window:
            return False
        if token == self.bos:
            self.restart()
            return False
        self.tail = (self.tail + (token,))[-4:]
        if len(self.tail) < 4:
            return False
        repeat = self.tail in self.seen
        self.seen.add(self.tail)
        self.flags.append(repeat)
        self.repeats += repeat
        if len(self.flags) > self.window:
            self.repeats -= self.flags[-self.window - 1]
        if len(self.flags) >= self.window and self.repeats >= self.limit:
            self.restart()
            return True
        return False


def _to_dtype(model, dtype):
    """Convert `model` to `dtype` in place and return a function that puts the original tensors back, bit for bit.

    Cheaper in memory than a converted copy: the float32 tensors are kept aside, so the round trip loses nothing."""
    params = [(p, p.data) for p in model.parameters()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    if all(p.dtype == dtype or not p.is_floating_point() for p, _ in params):
        return lambda: None
    model.to(dtype)

    def restore():
        for p, data in params:
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b

    return restore


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row: softmax at `temperature`, restricted to the smallest set whose mass reaches `top_p`."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # the nucleus almost always lies in the top few hundred tokens: sort those, and the whole vocabulary (262k for
    # Gemma, 15 ms a row) only for a row whose top candidates do not reach top_p
    k = min(4096, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)
    short = top.sum(-1) < top_p
    if short.any():
        top, order = probs.sort(dim=-1, descending=True)
    before = top.cumsum(-1) - top  # mass of the tokens ranked above each one
    top = top.masked_fill(before >= top_p, 0.0)
    pick = torch.multinomial(top, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)
