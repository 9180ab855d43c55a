"""Experiment 6: singular value spectra and energy curves of every group, and principal angles between the row spaces
of W_Q and W_K (the paper's premise, Eq. 14-15: Q and K project from a shared input subspace).

A full-row-rank W_Q (d_q >= d_in, as on Gemma-3-270M: 1024 x 640) spans the whole input space, so "the angle between
row spaces" is trivially zero there. What can be tested is whether the *dominant* input directions agree: the angles
between the top-r right singular subspaces of Q and K, against the angles two random r-dim subspaces of the same
space would have, plus how much of K's energy Q's top-r subspace captures.
"""

from __future__ import annotations

import math
import time

import torch

from jointrank.architectures import describe
from .common import load, out_dir, pyplot, set_threads, stamp, write_json

NAME = "spectra"
MEMBER_SETS = {"q": ("q_proj",), "k": ("k_proj",), "q+k": ("q_proj", "k_proj"), "v": ("v_proj",),
               "o": ("o_proj",), "gate": ("gate_proj",), "up": ("up_proj",), "gate+up": ("gate_proj", "up_proj"),
               "down": ("down_proj",)}
DIMS = (8, 16, 32, 64, 128)


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of A and B (orthonormal rows), descending."""
    return torch.linalg.svdvals(a.double() @ b.double().T).clamp(0, 1)


def top_right(w: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(w.double(), full_matrices=False).Vh[:r]


def random_baseline(d: int, r: int, draws: int = 20, seed: int = 0) -> dict:
    """Mean cosine of principal angles between two random r-dim subspaces of R^d (Haar), over seeded draws."""
    g = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(draws):
        a = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q.T
        b = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q.T
        means.append(float(principal_cosines(a, b).mean()))
    m = sum(means) / len(means)
    sd = math.sqrt(sum((x - m) ** 2 for x in means) / (len(means) - 1))
    return {"mean_cos": m, "sd_cos": sd}


def energy_ratio_for(s: torch.Tensor, fraction: float) -> float:
    """Smallest approximation ratio k / len(s) keeping `fraction` of the squared Frobenius norm."""
    e = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    k = int(torch.searchsorted(e, torch.tensor(fraction, dtype=torch.float64)).item()) + 1
    return min(k, len(s)) / len(s)


@torch.no_grad()
def run(model_spec: str, *, out: str | None = None, command: str = "", model=None, plot: bool = True) -> dict:
    started = time.perf_counter()
    set_threads()
    if model is None:
        model, _ = load(model_spec)
    layout = describe(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = []
    for index in range(layout.num_layers):
        prefix = f"{layout.layers_path}.{index}"
        weights = {}
        for g in layout.groups:
            if g.layer == index:
                for m in g.members:
                    weights[m.name.rsplit(".", 1)[1]] = model.get_submodule(m.name).weight.detach().float()
        spectra = {key: torch.linalg.svdvals(torch.cat([weights[n] for n in names])).tolist()
                   for key, names in MEMBER_SETS.items()}
        q, k = weights["q_proj"], weights["k_proj"]
        d_in = q.shape[1]
        vq, vk = torch.linalg.svd(q.double(), full_matrices=False).Vh, torch.linalg.svd(k.double(), full_matrices=False).Vh
        angles = {}
        for r in DIMS:
            if r > min(vq.shape[0], vk.shape[0]) or 2 * r > d_in:
                continue
            cos = principal_cosines(vq[:r], vk[:r])
            # energy of K inside Q's top-r input subspace, and of Q inside K's: 1 = the same dominant directions
            k_in_q = float((k.double() @ vq[:r].T).pow(2).sum() / k.double().pow(2).sum())
            q_in_k = float((q.double() @ vk[:r].T).pow(2).sum() / q.double().pow(2).sum())
            per_head = []
            for h in range(q.shape[0] // head_dim):
                qh = q[h * head_dim:(h + 1) * head_dim]
                if r <= min(qh.shape):
                    per_head.append(float(principal_cosines(top_right(qh, r), vk[:r]).mean()))
            angles[str(r)] = {"cosines": cos.tolist(), "mean_cos": float(cos.mean()),
                              "k_energy_in_q_top": k_in_q, "q_energy_in_k_top": q_in_k,
                              "per_head_mean_cos": per_head}
        layers.append({"layer": index, "prefix": prefix, "spectra": spectra, "qk_angles": angles})
    d_in = layout.groups[0].d_in
    baseline = {str(r): random_baseline(d_in, r) for r in DIMS if 2 * r <= d_in}
    summary = _summary(layers, baseline, d_in)
    result = {"experiment": NAME, "model": model_spec, "model_type": layout.model_type,
              "num_layers": layout.num_layers, "dims": list(DIMS), "random_baseline": baseline,
              "summary": summary, "layers": layers, "meta": stamp(command, started)}
    target = out_dir(NAME, out)
    write_json(target / f"{NAME}.json", result)
    if plot:
        _plot(result, target)
    return result


def _summary(layers: list[dict], baseline: dict, d_in: int) -> dict:
    energy = {}
    for key in MEMBER_SETS:
        r90 = [energy_ratio_for(torch.tensor(l["spectra"][key]), 0.90) for l in layers]
        r99 = [energy_ratio_for(torch.tensor(l["spectra"][key]), 0.99) for l in layers]
        energy[key] = {"ratio_for_90pct_energy_mean": sum(r90) / len(r90), "ratio_for_90pct_energy_min": min(r90),
                       "ratio_for_90pct_energy_max": max(r90), "ratio_for_99pct_energy_mean": sum(r99) / len(r99)}
    angles = {}
    for r, base in baseline.items():
        cos = [l["qk_angles"][r]["mean_cos"] for l in layers if r in l["qk_angles"]]
        kq = [l["qk_angles"][r]["k_energy_in_q_top"] for l in layers if r in l["qk_angles"]]
        if not cos:
            continue
        above = sum(c > base["mean_cos"] + 3 * base["sd_cos"] for c in cos)
        angles[r] = {"mean_cos_over_layers": sum(cos) / len(cos), "min_layer_mean_cos": min(cos),
                     "max_layer_mean_cos": max(cos), "random_mean_cos": base["mean_cos"],
                     "random_sd_cos": base["sd_cos"], "layers_above_random_3sd": above, "layers": len(cos),
                     "k_energy_in_q_top_mean": sum(kq) / len(kq), "random_energy_share": int(r) / d_in}
    return {"energy": energy, "qk_angles": angles}


def _plot(result: dict, target) -> None:
    plt = pyplot()

    keys = list(MEMBER_SETS)
    fig, axes = plt.subplots(3, 3, figsize=(12, 10), sharex=True, sharey=True)
    cmap = plt.get_cmap("viridis")
    n = result["num_layers"]
    for ax, key in zip(axes.flat, keys):
        for l in result["layers"]:
            s = torch.tensor(l["spectra"][key], dtype=torch.float64)
            e = (torch.cumsum(s ** 2, 0) / (s ** 2).sum()).numpy()
            x = [(i + 1) / len(e) for i in range(len(e))]
            ax.plot(x, e, color=cmap(l["layer"] / max(1, n - 1)), lw=0.9)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("approximation ratio k / min(d_out, d_in)")
    for ax in axes[:, 0]:
        ax.set_ylabel("energy kept")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n - 1))
    fig.colorbar(sm, ax=axes, label="layer")
    fig.suptitle(f"{result['model']}: energy kept by rank-k, per layer")
    fig.savefig(target / "energy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r, base in result["random_baseline"].items():
        ys = [l["qk_angles"][r]["mean_cos"] for l in result["layers"] if r in l["qk_angles"]]
        if not ys:
            continue
        line, = axes[0].plot(range(len(ys)), ys, marker="o", ms=3, label=f"r={r}")
        axes[0].axhline(base["mean_cos"], color=line.get_color(), ls="--", lw=0.8)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("mean cos(principal angle)")
    axes[0].set_title("top-r input subspaces of W_Q vs W_K (dashed: random subspaces)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    r = "64" if "64" in result["random_baseline"] else list(result["random_baseline"])[-1]
    for l in result["layers"]:
        if r in l["qk_angles"]:
            axes[1].plot(l["qk_angles"][r]["cosines"], color=cmap(l["layer"] / max(1, n - 1)), lw=0.9)
    axes[1].set_xlabel("principal angle index")
    axes[1].set_ylabel("cosine")
    axes[1].set_title(f"all principal cosines at r={r}, per layer")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target / "qk_angles.png", dpi=110)
    plt.close(fig)
