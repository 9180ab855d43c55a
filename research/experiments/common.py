"""What every experiment shares: loading, a seeded perplexity probe with per-window numbers, rank sweeps that reuse
one decomposition per unit, GQA expansion for per-head Q/K, and atomic result files.

Rank sweeps: an experiment evaluates the same units at many ranks, so each unit is decomposed once at full rank with
the core's `joint_rank_k`, and a rank-k approximation is the first k components of it (the truncated SVD is the
optimal rank-k approximation, Eckart–Young). The truncated product is written back into the original nn.Linear
weights ("dense rank-k"): the model computes exactly what `compress_` would, without re-factorising per point.
tests/test_experiments.py checks that equality against `compress_`.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jointrank import JointRankError
from jointrank.architectures import describe
from jointrank.linalg import joint_params, joint_rank_k, max_rank
from jointrank.plan import parse_layers

from .. import common
from ..common import mean_se

RESULTS = Path("results") / "experiments"


def set_threads(n: int | None = None) -> None:
    """The machine is shared: never more than 2 threads unless the caller asks (OMP_NUM_THREADS wins)."""
    env = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(env) if env and env.isdigit() else (n or 2))


def load(spec: str):
    from jointrank.sources import load_model

    model, tokenizer, _ = load_model(spec)
    return model, tokenizer


def out_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    d = Path(root) if root is not None else RESULTS / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_json(path: Path, payload: dict) -> Path:
    """An experiment's result file, written atomically (tensors and paths become lists and strings)."""
    return common.write_json(path, payload, indent=1, default=_jsonable, newline=False)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def stamp(command: str, started: float, **extra) -> dict:
    """Provenance every result file carries: the exact command, versions, wall time."""
    import platform

    import transformers

    from jointrank import __version__

    return {"command": command, "jointrank": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "wall_time_s": round(time.perf_counter() - started, 1),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


# How the experiments are started (from the repository root); results and hints quote it.
RUN = "python -m research.experiments"


def command_line(words: list[str], options: dict) -> str:
    """The command that reproduces a run, with every option spelled out (defaults included)."""
    parts = [*RUN.split(), *words]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def parse_floats(text: str | list | tuple, what: str) -> list[float]:
    if isinstance(text, (list, tuple)):
        return [float(v) for v in text]
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError as exc:
        raise JointRankError(f"{what}: expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0 < v <= 1 for v in values):
        raise JointRankError(f"{what}: every ratio must be in (0, 1]; got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------------------------
# Perplexity on a seeded subset of windows, with per-window numbers so differences get paired standard errors.


@dataclass
class PplProbe:
    windows: torch.Tensor  # [n, seqlen] token ids
    indices: list[int]  # which windows of the text, in order
    available: int
    seqlen: int
    seed: int
    text_name: str

    @classmethod
    def build(cls, tokenizer, *, text: str | None = None, text_name: str = "wikitext2", data_dir=None,
              seqlen: int = 512, max_windows: int = 8, seed: int = 0) -> "PplProbe":
        if tokenizer is None:
            raise JointRankError("perplexity needs a tokenizer, and the model came without one")
        if text is None:
            from jointrank.evaluate import data as data_mod
            from jointrank.evaluate.perplexity import load_text

            text = load_text(text_name, data_mod.resolve_data_dir(data_dir))
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        available = ids.numel() // seqlen
        if available < 1:
            raise JointRankError(f"{text_name}: {ids.numel()} tokens, fewer than one window of {seqlen}")
        n = min(max_windows, available)
        # A seeded sample of windows from the whole text rather than its first n: the first pages of WikiText-2
        # are one article, and a sample is what a standard error over windows speaks about.
        chosen = sorted(torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n].tolist())
        windows = torch.stack([ids[i * seqlen:(i + 1) * seqlen] for i in chosen])
        return cls(windows, chosen, available, seqlen, seed, text_name)

    def describe(self) -> dict:
        return {"text": self.text_name, "seqlen": self.seqlen, "windows": len(self.indices),
                "windows_available": self.available, "window_seed": self.seed, "window_indices": self.indices}

    @torch.no_grad()
    def measure(self, model) -> dict:
        from jointrank.evaluate.perplexity import window_nll

        was_training = model.training
        model.eval()
        started = time.perf_counter()
        per_window = []
        try:
            for i in range(len(self.windows)):
                total, count = window_nll(model, self.windows[i:i + 1])
                per_window.append(total / count)
        finally:
            model.train(was_training)
        mean = sum(per_window) / len(per_window)
        print(f"[{time.strftime('%H:%M:%S')}] perplexity {math.exp(mean):.3f} on {len(per_window)} windows "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        return {"ppl": math.exp(mean), "mean_nll": mean, "window_nll": per_window,
                "nll_se": mean_se(per_window)[1]}


def paired(base: dict, other: dict) -> dict:
    """Change in mean NLL against a baseline on the same windows: mean, paired SE, and the ppl ratio."""
    diffs = [b - a for a, b in zip(base["window_nll"], other["window_nll"])]
    mean = sum(diffs) / len(diffs)
    return {"delta_nll": mean, "delta_nll_se": mean_se(diffs)[1], "ppl_ratio": math.exp(mean)}


# ---------------------------------------------------------------------------------------------------------------
# Units and rank sweeps.


@dataclass(frozen=True)
class Part:
    module: str  # full nn.Linear path
    rows: tuple[int, int] | None = None  # a row block of it (one head), or the whole weight


@dataclass
class Unit:
    layer: int
    group: str
    label: str  # e.g. "q+k", "q", "gate+up", "q_h0+k_h0"
    parts: tuple[Part, ...]
    factors: object = None  # linalg.Factors at full rank
    dense_shapes: tuple = field(default=())

    @property
    def d_outs(self) -> tuple[int, ...]:
        return tuple(f.shape[0] for f in self.factors.outs)

    @property
    def d_in(self) -> int:
        return self.factors.basis.shape[1]

    @property
    def limit(self) -> int:
        return max_rank(self.d_outs, self.d_in)


def _weight(model, part: Part) -> torch.Tensor:
    w = model.get_submodule(part.module).weight.detach()
    return w if part.rows is None else w[part.rows[0]:part.rows[1]]


def make_units(model, group: str, method: str, layers: str = "all", per_head: bool = False) -> list[Unit]:
    """Units of one group: joint = one unit stacking the members; separate = one unit per member.

    per_head (qk only): one unit per attention head, Q rows of head h with K rows of the same head. Needs as many
    K heads as Q heads: call expand_kv_heads first on a GQA model.
    """
    if method not in ("joint", "separate"):
        raise JointRankError(f"method must be joint or separate, got {method!r}")
    layout = describe(model)
    chosen = set(parse_layers(layers, layout.num_layers))
    units = []
    for g in layout.groups:
        if g.group != group or g.layer not in chosen:
            continue
        names = [m.name for m in g.members]
        short = [n.rsplit(".", 1)[1].removesuffix("_proj") for n in names]
        if per_head:
            if group != "qk":
                raise JointRankError("per-head units exist only for qk")
            q, k = (model.get_submodule(n) for n in names)
            cfg = model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            heads = q.out_features // head_dim
            if k.out_features != q.out_features:
                raise JointRankError("per-head Q/K needs one K head per Q head; call expand_kv_heads first")
            for h in range(heads):
                rows = (h * head_dim, (h + 1) * head_dim)
                parts = (Part(names[0], rows), Part(names[1], rows))
                if method == "joint":
                    units.append(Unit(g.layer, group, f"q_h{h}+k_h{h}", parts))
                else:
                    units += [Unit(g.layer, group, f"q_h{h}", parts[:1]), Unit(g.layer, group, f"k_h{h}", parts[1:])]
        elif method == "joint" and len(names) > 1:
            units.append(Unit(g.layer, group, "+".join(short), tuple(Part(n) for n in names)))
        else:
            units += [Unit(g.layer, group, s, (Part(n),)) for n, s in zip(names, short)]
    if not units:
        raise JointRankError(f"no {group} units in layers {layers!r}")
    return units


def rank_for(unit: Unit, ratio: float) -> int:
    """The core plan's rule: k = round(ratio · min(Σ d_out, d_in)), at least 1."""
    return max(1, min(unit.limit, round(ratio * unit.limit)))


class RankSweep:
    """Decompose units once; then set any rank on them and restore the original weights."""

    def __init__(self, model, units: list[Unit], solver: str = "auto"):
        self.model, self.units = model, units
        self.originals: dict[str, torch.Tensor] = {}
        for unit in units:
            for part in unit.parts:
                if part.module not in self.originals:
                    self.originals[part.module] = model.get_submodule(part.module).weight.detach().clone()
            weights = [_weight(model, p) for p in unit.parts]
            unit.factors = joint_rank_k(weights, max_rank([w.shape[0] for w in weights], weights[0].shape[1]),
                                        solver=solver)

    @torch.no_grad()
    def apply(self, ratio: float | None = None, ranks: dict[int, int] | None = None,
              layers: set[int] | None = None) -> dict:
        """Set each unit to rank round(ratio·limit) (or ranks[unit index]); units outside `layers` (when given)
        keep their original weights. Returns parameter counts and errors of the units changed."""
        self.restore()
        rows, before, after = [], 0, 0
        for i, unit in enumerate(self.units):
            if layers is not None and unit.layer not in layers:
                continue
            k = ranks[i] if ranks is not None else rank_for(unit, ratio)
            f = unit.factors
            s2 = f.singular_values.double() ** 2
            energy = float(s2[:k].sum() / s2.sum()) if s2.sum() > 0 else 1.0
            errors = []
            for part, out in zip(unit.parts, f.outs):
                approx = out[:, :k] @ f.basis[:k]
                original = _weight(self.model, part).float()
                norm = float(torch.linalg.matrix_norm(original))
                errors.append(float(torch.linalg.matrix_norm(original - approx)) / norm if norm > 0 else 0.0)
                weight = self.model.get_submodule(part.module).weight
                target = weight if part.rows is None else weight[part.rows[0]:part.rows[1]]
                target.copy_(approx.to(weight.dtype))
            dense = sum(unit.d_outs) * unit.d_in
            factored = joint_params(unit.d_outs, unit.d_in, k)
            before, after = before + dense, after + factored
            rows.append({"layer": unit.layer, "label": unit.label, "rank": k, "limit": unit.limit,
                         "energy_kept": energy, "member_rel_errors": errors, "params_dense": dense,
                         "params_factored": factored})
        return {"params_dense": before, "params_factored": after, "units": rows}

    @torch.no_grad()
    def restore(self) -> None:
        for name, w in self.originals.items():
            self.model.get_submodule(name).weight.copy_(w)


def summarise_units(rows: list[dict]) -> dict:
    """Mean relative error per member kind (q, k, gate, ...) and the mean energy kept, over units."""
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        for name, err in zip(r["label"].split("+"), r["member_rel_errors"]):
            by_kind.setdefault(name.split("_h")[0], []).append(err)
    return {"member_rel_error": {k: sum(v) / len(v) for k, v in by_kind.items()},
            "energy_kept_mean": sum(r["energy_kept"] for r in rows) / len(rows)}


# ---------------------------------------------------------------------------------------------------------------
# GQA -> MHA, so "within a head" has one K block per Q head (what the paper's per-head joint rank-k assumes).


@torch.no_grad()
def expand_kv_heads(model) -> int:
    """Repeat each K/V head for the query heads that read it: the same function, with num_kv_heads = num_heads.

    Returns the group size (1 = already MHA). The logits are unchanged (tests check it); every per-head K block can
    then be approximated on its own.
    """
    import torch.nn as nn

    from jointrank.architectures import decoder_layers

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads == kv:
        return 1
    groups = heads // kv
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    _, layers = decoder_layers(model)
    for layer in layers:
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            new = nn.Linear(old.in_features, heads * head_dim, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            new.weight.copy_(old.weight.view(kv, head_dim, -1).repeat_interleave(groups, 0).reshape(heads * head_dim, -1))
            if old.bias is not None:
                new.bias.copy_(old.bias.view(kv, head_dim).repeat_interleave(groups, 0).reshape(-1))
            setattr(attn, name, new)
        attn.num_key_value_groups = 1
    cfg.num_key_value_heads = heads
    return groups


def save_result(name: str, out, result: dict, plotter=None, tag: str | None = None) -> dict:
    """Write an experiment's JSON (and, given a plotter, its PNG beside it) under results/experiments/NAME/.

    A tag names the files NAME_TAG.*, so a second run of an experiment sits beside the first (the report reads all)."""
    target = out_dir(name, out)
    stem = f"{name}_{tag}" if tag else name
    if tag:
        result["tag"] = tag
    write_json(target / f"{stem}.json", result)
    if plotter is not None:
        plotter(result, target / f"{stem}.png")
    return result


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: experiments run on machines with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
