"""Experiment 4: the denoising hypothesis (§3.4, §5.3). Is there any approximation ratio at which perplexity (or a
zero-shot score) is better than dense by more than its standard error?

Configurations, each swept over ratios close to 1:
  gate_up  joint rank-k of gate/up in every layer
  qk       separate rank-k of Q and K in every layer (the paper-10 structure)
  all      joint Q/K and gate/up, separate V, O and down, every layer
Perplexity differences are paired over the same windows; an improvement "beyond its standard error" means
Δ NLL < -2 SE. The noise between window choices is measured too: dense perplexity on --noise-seeds other window
samples, so a reader sees how much a different choice of windows alone moves the absolute number.
"""

from __future__ import annotations

import time

from jointrank import JointRankError
from .common import (PplProbe, RankSweep, load, make_units, paired, parse_floats, pyplot, save_result, set_threads,
                     stamp)

NAME = "denoise"
CONFIGS = {
    "gate_up": [("gate_up", "joint")],
    "qk": [("qk", "separate")],
    "all": [("qk", "joint"), ("gate_up", "joint"), ("v", "separate"), ("o", "separate"), ("down", "separate")],
}


def zero_shot(model, tokenizer, tasks, *, data_dir, limit, seed: int = 1234) -> dict:
    from jointrank.evaluate import evaluate

    res = evaluate(model, tokenizer, tasks, data_dir=data_dir, limit=limit, seed=seed, progress=False)["results"]
    # per_doc (0/1 per document, same seeded documents for every model) lets the report pair differences with dense
    keep = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "per_doc")
    return {t: {k: v for k, v in r.items() if k in keep} for t, r in res.items()}


def run(model_spec: str, *, ratios=(0.99, 0.95, 0.9, 0.8), configs=("gate_up", "qk", "all"), tasks=(),
        limit: int = 200, noise_seeds: int = 2, seqlen: int = 512, max_windows: int = 4, window_seed: int = 0,
        data_dir=None, text: str | None = None, evaluate: bool = True, out: str | None = None, command: str = "",
        model=None, tokenizer=None, plot: bool = True, tag: str | None = None) -> dict:
    started = time.perf_counter()
    set_threads()
    ratios = parse_floats(ratios, "--ratios")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise JointRankError(f"--configs: choose from {', '.join(CONFIGS)}; got {','.join(configs) or 'nothing'}")
    if not evaluate:
        raise JointRankError("the denoise experiment measures perplexity; it cannot run with --no-eval")
    if model is None:
        model, tokenizer = load(model_spec)
    probe = PplProbe.build(tokenizer, text=text, data_dir=data_dir, seqlen=seqlen, max_windows=max_windows,
                           seed=window_seed)
    dense = probe.measure(model)
    noise = []
    for s in range(1, noise_seeds + 1):
        other = PplProbe.build(tokenizer, text=text, data_dir=data_dir, seqlen=seqlen, max_windows=max_windows,
                               seed=window_seed + s)
        noise.append({"window_seed": window_seed + s, "window_indices": other.indices, **other.measure(model)})
    dense_zs = zero_shot(model, tokenizer, list(tasks), data_dir=data_dir, limit=limit) if tasks else None
    points = []
    for config in configs:
        units = [u for group, method in CONFIGS[config] for u in make_units(model, group, method)]
        sweep = RankSweep(model, units)
        for ratio in ratios:
            stats = sweep.apply(ratio)
            m = probe.measure(model)
            point = {"config": config, "ratio": ratio, "ppl": m["ppl"], "window_nll": m["window_nll"],
                     **paired(dense, m), "params_factored": stats["params_factored"],
                     "params_dense": stats["params_dense"],
                     "energy_kept_mean": sum(u["energy_kept"] for u in stats["units"]) / len(stats["units"])}
            point["improves_beyond_2se"] = point["delta_nll"] < -2 * point["delta_nll_se"]
            if tasks:
                point["zero_shot"] = zero_shot(model, tokenizer, list(tasks), data_dir=data_dir, limit=limit)
            points.append(point)
        sweep.restore()
    result = {"experiment": NAME, "model": model_spec, "ratios": ratios, "configs": list(configs),
              "config_groups": {c: CONFIGS[c] for c in configs}, "probe": probe.describe(), "dense": dense,
              "window_noise": noise, "tasks": list(tasks), "limit": limit if tasks else None,
              "dense_zero_shot": dense_zs, "points": points, "meta": stamp(command, started)}
    return save_result(NAME, out, result, plot_result if plot else None, tag=tag)


def plot_result(result: dict, path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.3))
    for i, config in enumerate(result["configs"]):
        pts = sorted((p for p in result["points"] if p["config"] == config), key=lambda p: p["ratio"])
        ax.errorbar([p["ratio"] for p in pts], [p["delta_nll"] for p in pts], yerr=[2 * p["delta_nll_se"] for p in pts],
                    marker="o", capsize=3, label=config)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("approximation ratio")
    ax.set_ylabel("Δ mean NLL vs dense (± 2 paired SE)")
    ax.set_title(f"{result['model']}: denoising? (below 0 = better than dense)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.invert_xaxis()
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
