"""Loss-aware allocation: every group's structure (dense, separate or joint) and ranks chosen together under one
parameter budget from an estimate of what each truncation costs the model's loss, measured on calibration text.

Why not spectral energy (planning.allocation): on Gemma-3-270M, dropping 0.08% of the energy of gate/up in the last
13 layers doubles perplexity while noise of the same norm does nothing (issue #15): what matters is how much of
the inputs a direction carries and how much the loss cares about the outputs it changes. Both are measured here.

The estimate (second order, per token): a unit's truncation changes its outputs by Δy = ΔW x, and
    ΔNLL ≈ ½ Σ_j f_j E[Δy_j²],  f_j = E[g_j²], g = ∂NLL/∂y (the diagonal Fisher of the unit's outputs),
taking g and Δy as uncorrelated. With C = E[x xᵀ] = S Sᵀ and the whitened truncation SVD-LLM uses
(W S = U Σ Vᵀ, keep k), ΔW C ΔWᵀ = Σ_{i>k} σ_i² u_i u_iᵀ, so the cost of rank k is
    L(k) = ½ Σ_{i>k} σ_i² Σ_j f_j u_ji²,
one eigen-decomposition per candidate unit (option_curves: no SVD needed) and one backward pass over the
calibration text for all f. A joint group is scored
both as one stacked unit and as its members alone, and the cheaper structure for the price wins. The budget is met
by Lagrangian relaxation (a price per parameter, bisected), then single ranks are handed back while it holds, as in
planning.allocation.

The curves come from the dense model's inputs and gradients, so they describe the damage of each unit alone; the
sum over units is the first term of what the whole plan costs. `results/quality.md` measures the plans it makes.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..architectures import JOINABLE, ModelLayout
from ..errors import JointRankError
from ..linalg import joint_params
from ..plan import CompressionPlan, PlanEntry, validate
from .allocation import hand_back, lowest_price


def output_fisher(model, calibration, names: list[str], *, progress: bool = True,
                  loss_chunk: int = 128) -> dict[str, torch.Tensor]:
    """{module name: E[g_j²]} for each output channel j of the named linear layers: the per-token NLL's squared
    gradient with respect to the layer's output, averaged over the calibration tokens (float64, CPU).

    Only activations need gradients here, so the parameters are frozen for the pass (no .grad the size of the model
    is ever allocated) and the graph starts at the embedding's output; the LM head's logits are made `loss_chunk`
    positions at a time (Gemma's vocabulary is 262k: full float32 logits of one window are 0.5 GB, and their softmax
    and gradient as much again). The gradient is the same as the whole window's summed NLL's."""
    from ..evaluate.perplexity import soft_cap, split_model

    sums = {n: None for n in names}
    tokens = 0

    def hook(name):
        def on_output(module, args, output):
            def on_grad(g):
                sq = g.detach().to(torch.float64).pow(2).sum(dim=tuple(range(g.dim() - 1))).cpu()
                sums[name] = sq if sums[name] is None else sums[name] + sq
            if output.requires_grad:
                output.register_hook(on_grad)
        return on_output

    def start_graph(module, args, output):  # the graph begins here, parameters frozen
        return output.detach().requires_grad_(True)

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    handles.append(model.get_input_embeddings().register_forward_hook(start_graph))
    device = next(model.parameters()).device
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    parts = split_model(model)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for row in tqdm(calibration.input_ids, desc="loss sensitivity", unit="window", disable=not progress):
            ids = row.unsqueeze(0).to(device)
            # summed, not averaged: each token's gradient is that of its own NLL, whatever the window length
            if parts is None:  # an arbitrary causal LM: full logits
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
            else:
                decoder, head, softcap = parts
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
                leaf = hidden.detach().requires_grad_(True)
                for start in range(0, leaf.shape[1], loss_chunk):
                    logits = soft_cap(head(leaf[:, start:start + loss_chunk]).float(), softcap)
                    target = ids[:, 1 + start:1 + start + loss_chunk]
                    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                      reduction="sum").backward()
                    del logits
                hidden.backward(leaf.grad)  # through the decoder: the hooks see each layer's output gradient
            tokens += ids.shape[1] - 1
    finally:
        for h in handles:
            h.remove()
        for p, needed in frozen:
            p.requires_grad_(needed)
        model.train(was_training)
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise JointRankError(f"no gradient reached {missing[0]}: cannot estimate its loss sensitivity")
    return {n: s / tokens for n, s in sums.items()}


@torch.no_grad()
def loss_curve(weights: list[torch.Tensor], second_moment: torch.Tensor, fisher: torch.Tensor, k_max: int,
               damping: float = 0.01) -> np.ndarray:
    """L(k) for k = 1..k_max (module doc): the estimated ΔNLL per token of truncating the stacked `weights` to
    rank k in the whitened metric. `fisher`: E[g_j²] of the stacked outputs."""
    fishers = list(torch.split(fisher, [w.shape[0] for w in weights]))
    everything = tuple(range(len(weights)))
    return option_curves(weights, second_moment, fishers, {everything: k_max}, damping)[everything]


@torch.no_grad()
def option_curves(weights: list[torch.Tensor], second_moment: torch.Tensor, fishers: list[torch.Tensor],
                  options: dict[tuple[int, ...], int], damping: float = 0.01) -> dict[tuple[int, ...], np.ndarray]:
    """{option: L(k) for k = 1..k_max} for each option {member indices: k_max} of one group, whose members
    (`weights`, their output Fisher `fishers`) read one input of second moment `second_moment`.

    The curve needs, per direction i of the whitened stack A = W S, only σ_i² and Σ_j f_j u_ji², never A's SVD:
    - A taller than wide: the eigenvectors v_i of AᵀA = Sᵀ (WᵀW) S, and σ_i² Σ_j f_j u_ji² = (A v_i)ᵀ F (A v_i) =
      v_iᵀ Sᵀ (Wᵀ F W) S v_i. A stack's WᵀW and WᵀFW are the sums of its members', so a joint group and its
      members alone share them, and only the (small) input side is decomposed;
    - otherwise: the eigenvectors u_i of A Aᵀ = W (C + λI) Wᵀ directly, without the Cholesky factor of C (which
      is what costs on an 8960-wide input).
    On a Qwen2.5-Coder-1.5B layer this is 3.2x faster than the SVDs of the whitened stacks, the curves equal to
    1e-14 (results/loss_planning_speed.md). The wide path uses the first ridge cholesky_factor tries; it raises it only
    when C + λI fails to factorise (λ = 0, rank-deficient C), where the factorised path raises it and this does not."""
    from ..methods.svd_llm import cholesky_factor, damped_moment

    ws = [w.detach().to(torch.float64) for w in weights]
    fs = [f.detach().to(device=ws[0].device, dtype=torch.float64) for f in fishers]
    c, lam = damped_moment(second_moment.to(ws[0].device), damping)
    chol, grams, out = None, {}, {}
    for idx, k_max in options.items():
        rows = sum(ws[i].shape[0] for i in idx)
        if rows > c.shape[0]:
            if chol is None:
                chol = cholesky_factor(second_moment.to(ws[0].device), damping)
            for i in idx:
                if i not in grams:
                    grams[i] = (ws[i].T @ ws[i], (ws[i] * fs[i][:, None]).T @ ws[i])
            gram = chol.T @ sum(grams[i][0] for i in idx) @ chol
            weighted = chol.T @ sum(grams[i][1] for i in idx) @ chol
            _, v = torch.linalg.eigh(gram)
            per_direction = 0.5 * ((weighted @ v) * v).sum(0)
        else:
            w = torch.cat([ws[i] for i in idx])
            f = torch.cat([fs[i] for i in idx])
            sigma2, u = torch.linalg.eigh((w @ c) @ w.T + lam * (w @ w.T))
            per_direction = 0.5 * sigma2.clamp_min(0) * (f[:, None] * u.pow(2)).sum(0)
        out[idx] = _tail_curve(per_direction.flip(0).cpu(), k_max)  # eigh: ascending; directions by σ descending
    return out


def _tail_curve(per_direction: torch.Tensor, k_max: int) -> np.ndarray:
    """L(k) = Σ_{i >= k} of the per-direction costs (largest σ first), for k = 1..k_max; zero past the last."""
    tail = per_direction.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{i' >= i}
    out = torch.zeros(k_max, dtype=torch.float64)
    n = min(k_max, len(tail) - 1)
    out[:n] = tail[1:n + 1]  # rank k keeps directions 0..k-1: the loss is the tail from k
    return out.numpy()


def candidate_options(g) -> dict[tuple[int, ...], int]:
    """{member indices: break-even rank} of each way a group can be factorised: stacked (a joinable group of more
    than one member) and each member alone, those that can save parameters at some rank."""
    options = [tuple(range(len(g.members)))] if g.group in JOINABLE and len(g.members) > 1 else []
    options += [(i,) for i in range(len(g.members))]
    out = {}
    for idx in options:
        rows = sum(g.members[i].d_out for i in idx)
        k_break = (rows * g.d_in - 1) // (rows + g.d_in)  # the largest rank with fewer parameters than dense
        if k_break >= 1:
            out[idx] = k_break
    return out


def loss_curves(model, calibration, layout: ModelLayout, config, *, progress: bool = True) -> dict:
    """{member names (one or a joint group's): L(k) curve up to its break-even rank} for every unit the rules allow
    to be compressed, each member alone and each joinable group stacked."""
    from ..methods.calibration import layerwise
    from .uniform import plan_units

    units = [(g, s) for g, s, _ in plan_units(layout, config) if s != "keep"]
    groups = {(g.layer, g.group): g for g, _ in units}
    names = [m.name for g in groups.values() for m in g.members]
    fisher = output_fisher(model, calibration, names, progress=progress)
    damping = float(config.method_params.get("damping", 0.01))
    curves: dict[tuple[str, ...], np.ndarray] = {}
    watch: dict[int, dict[str, str]] = {}
    for (layer, group), g in groups.items():
        watch.setdefault(layer, {})[group] = g.members[0].name
    bar = tqdm(total=len(groups), desc="loss curves", unit="group", disable=not progress)

    def on_layer(index, stats):
        for group, st in stats.items():
            g = groups[(index, group)]
            weights = [model.get_submodule(m.name).weight for m in g.members]
            found = option_curves(weights, st.second_moment, [fisher[m.name] for m in g.members],
                                  candidate_options(g), damping)
            for idx, curve in found.items():
                curves[tuple(g.members[i].name for i in idx)] = curve
            bar.update()

    try:
        layerwise(model, calibration, watch, on_layer, sequential=False)
    finally:
        bar.close()
    return curves


def plan_loss(layout: ModelLayout, config, curves: dict) -> CompressionPlan:
    """The plan minimising Σ L_u(k_u) under config.target, choosing per group dense / separate / joint."""
    from .uniform import plan_units

    validate(config)
    if config.target is None:
        raise JointRankError("loss-aware allocation needs a parameter budget (--target)")
    scope_total = layout.params_total if config.scope == "model" else layout.params_decoder
    budget = config.target * scope_total
    groups = []  # (group layout, [structure options: (structure, [unit curves: (names, dense, per_rank, curve)])])
    seen = set()
    for g, structure, _ in plan_units(layout, config):
        if (g.layer, g.group) in seen:
            continue
        seen.add((g.layer, g.group))
        if structure == "keep":
            groups.append((g, []))
            continue
        options = []
        joint_key = tuple(m.name for m in g.members)
        if len(g.members) > 1 and joint_key in curves:
            options.append(("joint", [_unit(g, g.members, curves[joint_key])]))
        alone = [_unit(g, (m,), curves[(m.name,)]) for m in g.members if (m.name,) in curves]
        if alone:
            options.append(("separate", alone))
        groups.append((g, options))

    def best_unit(unit, lam):
        _, dense, per_rank, curve = unit
        ks = np.arange(1, len(curve) + 1)
        cost = curve + lam * (ks * per_rank - dense)  # relative to staying dense (cost 0)
        i = int(np.argmin(cost))
        return (i + 1, float(cost[i])) if cost[i] < 0 else (0, 0.0)

    def choose(lam):
        """Per group: (structure or None for dense, ranks per unit of that structure)."""
        out = []
        for _, options in groups:
            best = (None, [], 0.0)
            for structure, units in options:
                picks = [best_unit(u, lam) for u in units]
                cost = sum(c for _, c in picks)
                if cost < best[2]:
                    best = (structure, [k for k, _ in picks], cost)
            out.append(best[:2])
        return out

    def removed(choice) -> int:
        total = 0
        for (_, options), (structure, ranks) in zip(groups, choice):
            units = dict(options).get(structure, [])
            total += sum(dense - k * per_rank for (_, dense, per_rank, _), k in zip(units, ranks) if k)
        return total

    # the most a plan can remove: every group at rank 1 in whichever structure removes more
    most = sum(max((sum(dense - per_rank for _, dense, per_rank, _ in units) for _, units in options), default=0)
               for _, options in groups)
    if most < budget:
        raise JointRankError(f"these groups cannot remove {config.target:.1%} of the {config.scope}'s parameters; "
                             "lower --target, add groups or use --scope decoder")
    choice = choose(lowest_price(choose, removed, budget))
    # hand single ranks back inside the chosen structures while the budget holds
    flat = [u for (_, options), (structure, _) in zip(groups, choice) for u in dict(options).get(structure, [])]
    ranks = [k for _, ks in choice for k in ks]
    cands = [(i, dense, per_rank, curve) for i, (_, dense, per_rank, curve) in enumerate(flat)]
    ranks = hand_back(cands, ranks, removed(choice) - budget)

    entries, position = [], 0
    for (g, options), (structure, picked) in zip(groups, choice):
        if structure is None:  # one keep entry for the whole group, as the other planners write it
            entries.append(_keep(g, g.members, "loss-aware allocation: kept dense" if options else ""))
            continue
        for names, dense, per_rank, _ in dict(options)[structure]:
            k = ranks[position]
            position += 1
            members = [m for m in g.members if m.name in names]
            if k == 0:
                entries.append(_keep(g, members, "loss-aware allocation: kept dense"))
            else:
                d_outs = tuple(m.d_out for m in members)
                entries.append(PlanEntry(g.layer, g.group, structure, tuple(names), d_outs, g.d_in, g.parent, k,
                                         dense, joint_params(d_outs, g.d_in, k)))
    return CompressionPlan(layout.model_type, layout.num_layers, tuple(entries), layout.params_total,
                           layout.params_decoder, config.to_dict(), None)


def _unit(g, members, curve):
    d_outs = [m.d_out for m in members]
    return (tuple(m.name for m in members), sum(d * g.d_in for d in d_outs), sum(d_outs) + g.d_in, curve)


def _keep(g, members, note: str) -> PlanEntry:
    d_outs = tuple(m.d_out for m in members)
    dense = sum(d * g.d_in for d in d_outs)
    return PlanEntry(g.layer, g.group, "keep", tuple(m.name for m in members), d_outs, g.d_in, g.parent, None, dense,
                     dense, note)
