"""Experiment 5 (§5.3, appendix C): implant a "watermark" sentence by fine-tuning, then see whether rank-k
approximation of gate/up in the last layers removes it, and what that costs on WikiText-2.

Fine-tune (appendix C, scaled to a CPU): every sequence is BOS + a random stretch of real text + the sentence; the loss
is taken on the sentence tokens only ("random text ... not taken into consideration"), so the model learns to emit
the sentence after arbitrary context. torch.optim.Adam with weight decay 0.01 and a learning rate in the paper's range
(2e-5 to 4e-5), on the decoder layers chosen by --train-layers (embeddings stay frozen: on a 262k vocabulary they are
most of the parameters and the sentence needs none of them), until greedy decoding from the sentence's first words
reproduces it, at most --max-steps steps. The paper's batch is 4096 tokens on 8 GPUs; here it is --batch sequences of
at most --context-tokens + the sentence.

Sweep: joint rank-k of gate/up on --layers (paper: last 24 of 32 -> last:3/4) at decreasing approximation ratios;
per ratio the sentence's perplexity, whether greedy decoding still reproduces it (and how many tokens match), and the
WikiText-2 perplexity on seeded windows.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

from jointrank import JointRankError
from jointrank.architectures import decoder_layers
from jointrank.plan import parse_layers
from .common import (PplProbe, RankSweep, load, make_units, paired, parse_floats, pyplot, save_result, set_threads,
                     stamp)

NAME = "watermark"
DEFAULT_SENTENCE = "The violet heron of Marrowby counts eleven silver lanterns before every winter storm."
DEFAULT_RATIOS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


class Watermark:
    """A sentence, its trigger (first words) and the tokens greedy decoding has to reproduce."""

    def __init__(self, tokenizer, sentence: str, prompt_words: int):
        words = sentence.split()
        if len(words) <= prompt_words or prompt_words < 1:
            raise JointRankError(f"--prompt-words {prompt_words} must leave at least one word of the sentence to "
                                 f"reproduce (the sentence has {len(words)} words)")
        self.sentence = sentence
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.ids = tokenizer(sentence, add_special_tokens=False).input_ids
        prompt = tokenizer(" ".join(words[:prompt_words]), add_special_tokens=False).input_ids
        if self.ids[:len(prompt)] != prompt:  # a tokenizer may merge across the cut: fall back to a token count
            prompt = self.ids[:max(1, min(len(self.ids) - 1, len(prompt)))]
        self.prompt = self.bos + prompt
        self.target = self.ids[len(prompt):]

    @torch.no_grad()
    def nll(self, model) -> float:
        """Mean NLL of the sentence's tokens after BOS: exp of it is the sentence perplexity."""
        ids = torch.tensor([self.bos + self.ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        targets = ids[0, 1:]  # with a BOS these are exactly the sentence's tokens; without one, all but the first
        return float(F.cross_entropy(logits, targets))

    @torch.no_grad()
    def greedy(self, model) -> list[int]:
        ids = list(self.prompt)
        for _ in range(len(self.target)):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
        return ids[len(self.prompt):]

    def check(self, model) -> dict:
        was = model.training
        model.eval()
        try:
            out = self.greedy(model)
            nll = self.nll(model)
        finally:
            model.train(was)
        match = sum(a == b for a, b in zip(out, self.target))
        prefix = next((i for i, (a, b) in enumerate(zip(out, self.target)) if a != b), len(self.target))
        return {"sentence_nll": nll, "sentence_ppl": math.exp(nll), "reproduced": out == self.target,
                "tokens_matched": match, "prefix_matched": prefix, "tokens_to_reproduce": len(self.target),
                "greedy_ids": out}


def _trainable(model, layers: str) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    _, blocks = decoder_layers(model)
    params = []
    for i in parse_layers(layers, len(blocks)):
        for p in blocks[i].parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def fine_tune(model, mark: Watermark, context_ids: torch.Tensor, *, lr: float, weight_decay: float, steps: int,
              batch: int, context_tokens: int, train_layers: str, seed: int, extra_steps: int = 0) -> dict:
    """Adam steps on the sentence (after random real-text context) until greedy decoding reproduces it."""
    params = _trainable(model, train_layers)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    history, done_at = [], None
    sentence = torch.tensor(mark.ids)
    try:
        for step in range(1, steps + 1):
            started = time.perf_counter()
            seqs, masks = [], []
            for b in range(batch):
                # one sequence with no context at all, the rest after a random stretch of real text
                n = 0 if b == 0 else int(torch.randint(1, context_tokens + 1, (1,), generator=g))
                start = int(torch.randint(0, max(1, context_ids.numel() - n), (1,), generator=g))
                ctx = context_ids[start:start + n]
                seq = torch.cat([torch.tensor(mark.bos, dtype=torch.long), ctx, sentence])
                mask = torch.zeros(len(seq), dtype=torch.bool)
                mask[len(seq) - len(sentence):] = True
                seqs.append(seq)
                masks.append(mask)
            width = max(len(s) for s in seqs)
            # left padding keeps the sentence at the end; pads are masked out of attention and loss
            ids = torch.zeros(batch, width, dtype=torch.long)
            attn = torch.zeros(batch, width, dtype=torch.long)
            labels = torch.full((batch, width), -100, dtype=torch.long)
            for i, (s, m) in enumerate(zip(seqs, masks)):
                ids[i, width - len(s):] = s
                attn[i, width - len(s):] = 1
                labels[i, width - len(s):][m] = s[m]
            model.train()
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state = mark.check(model)
            history.append({"step": step, "loss": loss.item(), "seconds": round(time.perf_counter() - started, 1),
                            **{k: state[k] for k in ("sentence_nll", "reproduced", "prefix_matched")}})
            print(f"[{time.strftime('%H:%M:%S')}] step {step}: loss {loss.item():.4f}, sentence nll "
                  f"{state['sentence_nll']:.4f}, reproduced {state['reproduced']}", file=sys.stderr, flush=True)
            if state["reproduced"] and done_at is None:
                done_at = step
            if done_at is not None and step >= done_at + extra_steps:
                break
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return {"steps": history, "reproduced_at_step": done_at, "trained_parameters": sum(p.numel() for p in params)}


def run(model_spec: str, *, sentence: str = DEFAULT_SENTENCE, prompt_words: int = 3, lr: float = 4e-5,
        weight_decay: float = 0.01, max_steps: int = 10, extra_steps: int = 0, batch: int = 8,
        context_tokens: int = 48, train_layers: str = "all", group: str = "gate_up", method: str = "joint",
        layers: str = "last:3/4", ratios=DEFAULT_RATIOS, seqlen: int = 512, max_windows: int = 4,
        window_seed: int = 0, seed: int = 0, data_dir=None, text: str | None = None, evaluate: bool = True,
        out: str | None = None, command: str = "", model=None, tokenizer=None, plot: bool = True) -> dict:
    started = time.perf_counter()
    set_threads()
    ratios = parse_floats(ratios, "--ratios")
    if not 0 < lr < 1:
        raise JointRankError(f"--lr must be in (0, 1); got {lr}")
    if max_steps < 1 or batch < 1:
        raise JointRankError("--max-steps and --batch must be at least 1")
    if model is None:
        model, tokenizer = load(model_spec)
    if tokenizer is None:
        raise JointRankError("the watermark experiment needs a tokenizer, and the model came without one")
    torch.manual_seed(seed)
    mark = Watermark(tokenizer, sentence, prompt_words)
    if text is None:
        from jointrank.evaluate import data as data_mod
        from jointrank.evaluate.perplexity import load_text

        text = load_text("wikitext2", data_mod.resolve_data_dir(data_dir))
    context_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    probe = PplProbe.build(tokenizer, text=text, seqlen=seqlen, max_windows=max_windows, seed=window_seed) \
        if evaluate else None
    units = make_units(model, group, method, layers)  # fails fast on a bad group/layer spec, before training

    before = mark.check(model)
    base_ppl = probe.measure(model) if probe else None
    training = fine_tune(model, mark, context_ids, lr=lr, weight_decay=weight_decay, steps=max_steps, batch=batch,
                         context_tokens=context_tokens, train_layers=train_layers, seed=seed, extra_steps=extra_steps)
    after = mark.check(model)
    tuned_ppl = probe.measure(model) if probe else None

    sweep = RankSweep(model, units)
    points = []
    for ratio in sorted(ratios, reverse=True):
        stats = sweep.apply(ratio)
        point = {"ratio": ratio, "params_factored": stats["params_factored"], "params_dense": stats["params_dense"],
                 "energy_kept_mean": sum(u["energy_kept"] for u in stats["units"]) / len(stats["units"]),
                 **mark.check(model)}
        if probe:
            m = probe.measure(model)
            point.update(wikitext_ppl=m["ppl"], window_nll=m["window_nll"], vs_tuned=paired(tuned_ppl, m),
                         vs_original=paired(base_ppl, m))
        points.append(point)
    sweep.restore()
    result = {"experiment": NAME, "model": model_spec, "sentence": sentence, "prompt_ids": mark.prompt,
              "target_ids": mark.target,
              "settings": {"prompt_words": prompt_words, "lr": lr, "weight_decay": weight_decay, "optimizer": "Adam",
                           "max_steps": max_steps, "extra_steps": extra_steps, "batch": batch,
                           "context_tokens": context_tokens, "train_layers": train_layers, "group": group,
                           "method": method, "layers": layers, "seed": seed},
              "probe": probe.describe() if probe else None, "before": before, "after_fine_tune": after,
              "training": training, "wikitext_original": base_ppl, "wikitext_tuned": tuned_ppl,
              "points": points, "meta": stamp(command, started)}
    return save_result(NAME, out, result, plot_result if plot else None)


def plot_result(result: dict, path) -> None:
    plt = pyplot()

    pts = sorted(result["points"], key=lambda p: p["ratio"])
    x = [p["ratio"] for p in pts]
    evaluated = "wikitext_ppl" in pts[0]
    fig, axes = plt.subplots(1, 2 if evaluated else 1, figsize=(12 if evaluated else 6, 4.3), squeeze=False)
    ax = axes[0][0]
    ax.plot(x, [p["sentence_ppl"] for p in pts], marker="o", color="C0", label="sentence perplexity")
    for p in pts:
        ax.scatter([p["ratio"]], [p["sentence_ppl"]], s=90, facecolors="C2" if p["reproduced"] else "none",
                   edgecolors="C2" if p["reproduced"] else "C3", zorder=3)
    ax.axhline(result["before"]["sentence_ppl"], color="gray", ls="--", lw=0.8, label="before fine-tuning")
    ax.set_yscale("log")
    ax.set_xlabel(f"approximation ratio of {result['settings']['group']} ({result['settings']['layers']})")
    ax.set_ylabel("sentence perplexity (filled: greedy reproduces it)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.invert_xaxis()
    if evaluated:
        ax = axes[0][1]
        ax.errorbar(x, [p["wikitext_ppl"] for p in pts],
                    yerr=[p["wikitext_ppl"] * p["vs_tuned"]["delta_nll_se"] for p in pts], marker="o", capsize=3)
        ax.axhline(result["wikitext_original"]["ppl"], color="gray", ls="--", lw=0.8, label="original model")
        ax.axhline(result["wikitext_tuned"]["ppl"], color="C1", ls=":", lw=0.8, label="after fine-tuning")
        ax.set_xlabel("approximation ratio")
        ax.set_ylabel("WikiText-2 perplexity (± paired SE)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.invert_xaxis()
    fig.suptitle(f"{result['model']}: watermark purification")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
