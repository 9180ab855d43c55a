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
The result is an ordinary CompressionPlan.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from ..architectures import describe
from ..errors import JointRankError
from ..linalg import joint_params
from ..plan import CompressionPlan, PlanEntry, plan_units, validate
from . import parse

PRIORS = ("flat", "depth", "residual")
ATTENTION_GROUPS = ("qk", "v", "o")


def layer_prior(layer: int, num_layers: int, prior: str) -> float:
    if prior == "flat":
        return 1.0
    if prior == "depth":
        return 2.0 - layer / max(1, num_layers - 1)
    raise JointRankError(f"unknown allocation prior {prior!r}; use {', '.join(PRIORS)}")


@torch.no_grad()
def residual_priors(model) -> dict[tuple[int, str], float]:
    """{(layer, 'attn' | 'mlp'): (s_b / R_l)²} from the post-block norms and the embedding (see the module doc)."""
    from ..architectures import decoder_layers

    _, layers = decoder_layers(model)
    first = layers[0]
    if not (hasattr(first, "post_attention_layernorm") and hasattr(first, "post_feedforward_layernorm")
            and hasattr(first, "pre_feedforward_layernorm")):
        raise JointRankError("the residual prior needs norms after each block (Gemma-2/3 style); use flat or depth")
    offset = 1.0 if "Gemma" in type(first.post_attention_layernorm).__name__ else 0.0  # Gemma scales by (1 + γ)

    def scale(norm) -> float:
        return float((offset + norm.weight.double()).pow(2).mean())

    emb = model.get_input_embeddings().weight.double()
    d = emb.shape[1]
    # Gemma multiplies embeddings by sqrt(d); the squared stream norm per coordinate starts at RMS(emb)²·d
    stream = float(emb.pow(2).mean()) * (d if offset else 1.0)
    out = {}
    for i, layer in enumerate(layers):
        for block, norm in (("attn", layer.post_attention_layernorm), ("mlp", layer.post_feedforward_layernorm)):
            s2 = scale(norm)
            out[(i, block)] = s2 / stream
            stream += s2
    return out


@torch.no_grad()
def unit_spectrum(weights: list[torch.Tensor], method_spec: str) -> np.ndarray:
    """Squared singular values of the unit in the metric its method truncates in (data-free methods only)."""
    method, option = parse(method_spec)
    if method.name == "balanced" and len(weights) > 1:
        from .balanced import member_weights

        # the "alone" weights depend on the rank; the norm weights are a rank-free stand-in for planning
        scales = member_weights(weights, 1, "norm" if option == "alone" else option)
        weights = [w.to(torch.float64) * a for w, a in zip(weights, scales)]
    m = torch.cat([w.detach().to(torch.float64) for w in weights], dim=0)
    gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T  # the small side: s² are its eigenvalues
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).numpy()


def plan_global(model, config, *, prior: str = "flat", spectra: dict | None = None) -> CompressionPlan:
    """`spectra`: an optional cache {member names: squared singular values}, filled here, for planning several
    budgets of the same (dense) model without recomputing them."""
    validate(config)
    if config.target is None:
        raise JointRankError("global allocation needs a parameter budget (--target)")
    layout = describe(model)
    units = plan_units(layout, config)
    scope_total = layout.params_total if config.scope == "model" else layout.params_decoder
    budget = config.target * scope_total

    block_prior = residual_priors(model) if prior == "residual" else None

    def unit_prior(g) -> float:
        if block_prior is not None:
            return block_prior[(g.layer, "attn" if g.group in ATTENTION_GROUPS else "mlp")]
        return layer_prior(g.layer, layout.num_layers, prior)

    cands = []  # per factorisable unit: (index in units, dense params, cost per rank, prior·relative tail energy)
    for index, (g, method, idx) in enumerate(units):
        if method == "keep":
            continue
        members = [g.members[i] for i in idx]
        d_outs, d_in = [m.d_out for m in members], g.d_in
        dense = sum(d * d_in for d in d_outs)
        per_rank = sum(d_outs) + d_in
        k_break = (dense - 1) // per_rank  # largest rank whose factors are smaller than the dense weights
        if k_break < 1:
            continue
        weights = [model.get_submodule(m.name).weight.detach() for m in members]
        key = tuple(m.name for m in members)
        if spectra is not None and key in spectra:
            energy = spectra[key]
        else:
            energy = unit_spectrum(weights, config.method)
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
    lo, hi = 0.0, 1.0
    while removed(choose(hi)) < budget:  # a higher price per parameter removes more
        hi *= 4
    lo = hi / 4 if hi > 1.0 else 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if removed(choose(mid)) >= budget:
            hi = mid
        else:
            lo = mid
    ranks = _hand_back(cands, choose(hi), removed(choose(hi)) - budget)

    entries = []
    chosen = {cand[0]: k for cand, k in zip(cands, ranks)}
    for index, (g, method, idx) in enumerate(units):
        members = tuple(g.members[i] for i in idx)
        names, d_outs, d_in = tuple(m.name for m in members), tuple(m.d_out for m in members), g.d_in
        dense = sum(d * d_in for d in d_outs)
        k = chosen.get(index, 0)
        if method == "keep" or k == 0:
            note = "global allocation: kept dense" if method != "keep" else ""
            entries.append(PlanEntry(g.layer, g.group, "keep", names, d_outs, d_in, g.parent, None, dense, dense, note))
        else:
            entries.append(PlanEntry(g.layer, g.group, method, names, d_outs, d_in, g.parent, k, dense,
                                     joint_params(d_outs, d_in, k)))
    cfg = config.to_dict()
    cfg["allocation_prior"] = prior
    return CompressionPlan(layout.model_type, layout.num_layers, tuple(entries), layout.params_total,
                           layout.params_decoder, cfg, None)


def _hand_back(cands, ranks: list[int], slack: float) -> list[int]:
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
