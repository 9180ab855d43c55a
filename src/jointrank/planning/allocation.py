"""Global rank allocation, data-free: one parameter budget, every unit's rank chosen together from its spectrum.

Uniform allocation gives every factorised unit the same approximation ratio, although spectra differ a lot between
layers and groups: some units lose a few percent of their energy at that ratio, others most of it. Here each unit u
(a matrix, or a joint group) is scored by the relative energy its rank-k truncation throws away,
e_u(k) = Σ_{i≥k} s_i² / Σ s_i² (in the metric of the config's method: the balanced stack for `balanced`), times a
data-free sensitivity prior p_u, and the plan minimises Σ_u p_u e_u(k_u) subject to the parameter budget. Each unit
may also stay dense (error 0, its dense size): the cost of a rank is k·(Σd_out + d_in), which only beats the dense
size below a break-even rank, so the problem is not convex. It is solved by Lagrangian relaxation — for a price λ
per parameter every unit independently picks the option minimising p_u e_u(k) + λ·params(k), exact even for the
dense/factorised jump — with λ bisected to the budget, then a greedy pass hands back single ranks (best error
reduction per parameter first) while the budget still holds, so the plan lands within one rank step of the target.

Priors (`prior=`): flat (1 everywhere), depth (2 at the first layer falling linearly to 1 at the last: an error
early in the network passes through more layers), residual (models with norms after each block, Gemma-2/3: a
block writes into the residual stream with the scale of its post-norm, s_b = RMS(1 + γ_b); every later block
reads the stream through a norm, so what it sees is the perturbation *relative* to the stream, whose norm before
layer l is estimated, data-free, as R_l² = RMS(embedding)²·d + Σ_{blocks before} s²; prior = (s_b / R_l)²).
The result is an ordinary CompressionPlan. The weights are read through a tensor reader (`tensors`: a model's,
planning.ModelTensors, or a safetensors checkpoint's, stream.TensorSource), one unit at a time, so streaming plans
the same ranks from the files as the in-memory path does from the model, without holding the model.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from ..architectures import LLAMA_STYLE_GROUPS, ModelLayout
from ..errors import JointRankError
from ..linalg import joint_params
from ..methods import method_of, settings_for
from ..plan import ALLOCATION_PRIORS, CompressionPlan, PlanEntry, validate
from .uniform import plan_units

PRIORS = ALLOCATION_PRIORS
ATTENTION_PARENT = LLAMA_STYLE_GROUPS["qk"][0]  # the module holding the attention projections (self_attn)


def layer_prior(layer: int, num_layers: int, prior: str) -> float:
    if prior == "flat":
        return 1.0
    if prior == "depth":
        return 2.0 - layer / max(1, num_layers - 1)
    raise JointRankError(f"unknown allocation prior {prior!r}; use {', '.join(PRIORS)}")


@torch.no_grad()
def residual_priors(layout: ModelLayout, tensors) -> dict[tuple[int, str], float]:
    """{(layer, 'attn' | 'mlp'): (s_b / R_l)²} from the post-block norms and the embedding (see the module doc)."""
    names = set(tensors.names())

    def norm_name(layer: int, norm: str) -> str:
        return f"{layout.layers_path}.{layer}.{norm}.weight"

    needed = ("post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm")
    embedding = sorted(n for n in names if n.endswith("embed_tokens.weight"))
    if not all(norm_name(0, n) in names for n in needed) or not embedding:
        raise JointRankError("the residual prior needs norms after each block (Gemma-2/3 style); use flat or depth")
    offset = 1.0 if layout.model_type.startswith("gemma") else 0.0  # Gemma's norms scale by (1 + γ)

    def scale(name: str) -> float:
        return float((offset + tensors.read([name])[name].double()).pow(2).mean())

    emb = tensors.read(embedding[:1])[embedding[0]].double()
    d = emb.shape[1]
    # Gemma multiplies embeddings by sqrt(d); the squared stream norm per coordinate starts at RMS(emb)²·d
    stream = float(emb.pow(2).mean()) * (d if offset else 1.0)
    out = {}
    for i in range(layout.num_layers):
        for block, norm in (("attn", "post_attention_layernorm"), ("mlp", "post_feedforward_layernorm")):
            s2 = scale(norm_name(i, norm))
            out[(i, block)] = s2 / stream
            stream += s2
    return out


@torch.no_grad()
def unit_spectrum(weights: list[torch.Tensor], method_spec) -> np.ndarray:
    """Squared singular values of the unit in the metric its method truncates in (data-free methods only).
    `method_spec`: a method name or its settings."""
    settings = settings_for(method_spec)
    method, option = method_of(settings), getattr(settings, "weighting", None)
    if method.name == "balanced" and len(weights) > 1:
        from ..methods.balanced import member_weights

        # the "alone" weights depend on the rank; the norm weights are a rank-free stand-in for planning
        scales = member_weights(weights, 1, "norm" if option == "alone" else option)
        weights = [w.to(torch.float64) * a for w, a in zip(weights, scales)]
    m = torch.cat([w.detach().to(torch.float64) for w in weights], dim=0)
    gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T  # the small side: s² are its eigenvalues
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).numpy()


def plan_global(layout: ModelLayout, config, tensors, *, spectra: dict | None = None) -> CompressionPlan:
    """Ranks for every unit of `layout` under config.target, from the spectra of the weights `tensors` reads.

    `spectra`: an optional cache {member names: squared singular values}, filled here, for planning several
    budgets of the same (dense) model without recomputing them."""
    validate(config)
    if config.target is None:
        raise JointRankError("global allocation needs a parameter budget (--target)")
    prior = config.allocation_prior
    method = settings_for(config.method, config.method_params)
    units = plan_units(layout, config)
    scope_total = layout.params_total if config.scope == "model" else layout.params_decoder
    budget = config.target * scope_total

    block_prior = residual_priors(layout, tensors) if prior == "residual" else None

    group_of = layout.group_of()

    def unit_prior(g) -> float:
        """The prior of the unit's layer; a cross-layer unit's is the mean over the layers sharing its basis."""
        block = "attn" if g.parent.rsplit(".", 1)[-1] == ATTENTION_PARENT else "mlp"
        layers = sorted({group_of[m.name].layer for m in g.members})
        if block_prior is not None:
            return float(np.mean([block_prior[(layer, block)] for layer in layers]))
        return float(np.mean([layer_prior(layer, layout.num_layers, prior) for layer in layers]))

    cands = []  # per factorisable unit: (index in units, dense params, cost per rank, prior·relative tail energy)
    for index, (g, structure, idx) in enumerate(units):
        if structure == "keep":
            continue
        members = [g.members[i] for i in idx]
        d_outs, d_in = [m.d_out for m in members], g.d_in
        dense = sum(d * d_in for d in d_outs)
        per_rank = sum(d_outs) + d_in
        k_break = (dense - 1) // per_rank  # largest rank whose factors are smaller than the dense weights
        if k_break < 1:
            continue
        key = tuple(m.name for m in members)
        if spectra is not None and key in spectra:
            energy = spectra[key]
        else:
            read = tensors.read([f"{name}.weight" for name in key])
            energy = unit_spectrum([read[f"{name}.weight"] for name in key], method)
            if spectra is not None:
                spectra[key] = energy
        total = energy.sum()
        # tail[k] = energy lost at rank k, for k = 1..k_break, relative to the unit's total
        tail = (total - np.cumsum(energy)[:k_break]) / total if total > 0 else np.zeros(k_break)
        cands.append((index, dense, per_rank, unit_prior(g) * tail))

    def choose(lam: float) -> list[int]:
        ranks = []
        for _, dense, per_rank, err in cands:
            ks = np.arange(1, len(err) + 1)
            cost = err + lam * (ks * per_rank - dense)  # relative to staying dense (cost 0)
            best = int(np.argmin(cost))
            ranks.append(best + 1 if cost[best] < 0 else 0)  # 0 = stay dense
        return ranks

    def removed(ranks) -> int:
        return sum(dense - (k * per_rank if k else dense) for (_, dense, per_rank, _), k in zip(cands, ranks))

    most = removed([1] * len(cands))
    if most < budget:
        raise JointRankError(
            f"this structure cannot remove {config.target:.1%} of the {config.scope}'s parameters: even at rank 1 "
            f"everywhere it removes {most / scope_total:.1%}. Lower --target, add groups or use --scope decoder")
    hi = lowest_price(choose, removed, budget)
    ranks = hand_back(cands, choose(hi), removed(choose(hi)) - budget)

    entries = []
    chosen = {cand[0]: k for cand, k in zip(cands, ranks)}
    for index, (g, structure, idx) in enumerate(units):
        members = tuple(g.members[i] for i in idx)
        names, d_outs, d_in = tuple(m.name for m in members), tuple(m.d_out for m in members), g.d_in
        dense = sum(d * d_in for d in d_outs)
        k = chosen.get(index, 0)
        if structure == "keep" or k == 0:
            note = "global allocation: kept dense" if structure != "keep" else ""
            entries.append(PlanEntry(g.layer, g.group, "keep", names, d_outs, d_in, g.parent, None, dense, dense, note))
        else:
            entries.append(PlanEntry(g.layer, g.group, structure, names, d_outs, d_in, g.parent, k, dense,
                                     joint_params(d_outs, d_in, k)))
    return CompressionPlan(layout.model_type, layout.num_layers, tuple(entries), layout.params_total,
                           layout.params_decoder, config.to_dict(), None)


def lowest_price(choose, removed, budget: int) -> float:
    """The Lagrangian search both planners share: the lowest price per parameter whose choice `choose(price)`
    removes at least `budget` parameters (`removed(choice)`), by bisection (a higher price removes more)."""
    hi = 1.0
    while removed(choose(hi)) < budget:
        hi *= 4
    lo = hi / 4 if hi > 1.0 else 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if removed(choose(mid)) >= budget:
            hi = mid
        else:
            lo = mid
    return hi


def hand_back(cands, ranks: list[int], slack: float) -> list[int]:
    """Raise single ranks, largest error reduction per parameter first, while the removal stays within budget."""
    ranks = list(ranks)
    heap = []

    def push(i):
        k = ranks[i]
        _, _, per_rank, err = cands[i]
        if 1 <= k < len(err):  # a dense unit stays dense; a unit at its break-even rank cannot grow
            heapq.heappush(heap, (-(err[k - 1] - err[k]) / per_rank, i))

    for i in range(len(cands)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        per_rank = cands[i][2]
        if per_rank <= slack:
            ranks[i] += 1
            slack -= per_rank
            push(i)
    return ranks
