"""The uniform planner: one approximation ratio (or rank) for every factorised unit, solved for a budget if asked."""

from __future__ import annotations

from ..architectures import GroupLayout, ModelLayout
from ..errors import JointRankError
from ..linalg import joint_params, max_rank
from ..plan import CompressionPlan, JointRankConfig, PlanEntry, parse_layers, span_of, unit_cost, validate


def plan_uniform(layout: ModelLayout, config: JointRankConfig) -> CompressionPlan:
    validate(config)
    units = plan_units(layout, config)
    if config.target is not None:
        ratio = _solve_ratio(layout, config, units)
    else:
        ratio = config.ratio
    entries = _entries(layout, units, ratio=ratio, rank=config.rank, only_if_smaller=config.only_if_smaller,
                       keep_slow=config.keep_slow)
    return CompressionPlan(layout.model_type, layout.num_layers, tuple(entries), layout.params_total,
                           layout.params_decoder, config.to_dict(), ratio)


def plan_units(layout: ModelLayout, config: JointRankConfig) -> list[tuple[GroupLayout, str, tuple[int, ...]]]:
    """(group, structure, member indices) per factorisation unit, in model order; kept groups have structure keep."""
    layer_sets = {g: set(parse_layers(r.layers, layout.num_layers)) for g, r in config.rules.items()}
    units = []
    for g in layout.groups:
        rule = config.rules.get(g.group)
        if rule is None or rule.structure == "keep" or g.layer not in layer_sets[g.group]:
            units.append((g, "keep", tuple(range(len(g.members)))))
        elif rule.structure == "joint":
            units.append((g, "joint", tuple(range(len(g.members)))))
        else:
            units.extend((g, "separate", (i,)) for i in range(len(g.members)))
    if config.share_layers < 2:
        return units
    return share_across_layers(units, config.share_layers, config.share_groups)


def share_across_layers(units: list, span: int, groups=None) -> list:
    """Merge the factorised units of `span` adjacent layers into cross-layer units sharing one input basis.

    Units merge when they are the same group, structure and members (joint gate/up of layers 4 and 5; the q_proj
    of a separate Q/K in layers 4 and 5) and their layers are consecutive; runs are cut into spans from their first
    layer, and a shorter tail span (or a layer with no neighbour) keeps what it has. A merged unit is one GroupLayout
    whose members come from every layer of the span, registered on the first layer (where its basis is stored). It
    is always "joint": its members share the basis. Its group name is the group's for a joint or single-member group
    (o, down, gate_up) and the member's attribute for one member of a separate multi-member group (q_proj), so that
    two cross-layer units of one layer never name the same basis. `groups`: only these groups share (None: all)."""
    runs: dict[tuple, list[list[int]]] = {}  # (group, structure, member indices) -> runs of unit positions
    for pos, (g, structure, idx) in enumerate(units):
        if structure == "keep" or (groups is not None and g.group not in groups):
            continue
        key = (g.group, structure, idx)
        chains = runs.setdefault(key, [])
        if chains and units[chains[-1][-1]][0].layer == g.layer - 1 and len(chains[-1]) < span:
            chains[-1].append(pos)
        else:
            chains.append([pos])
    merged: dict[int, tuple] = {}  # position of a span's first unit -> the merged unit
    absorbed: set[int] = set()
    for (group, structure, idx), chains in runs.items():
        for chain in chains:
            if len(chain) < 2:
                continue
            first = units[chain[0]][0]
            members = tuple(units[p][0].members[i] for p in chain for i in idx)
            single = structure == "joint" or len(first.members) == 1
            name = group if single else first.members[idx[0]].name.rsplit(".", 1)[1]
            merged[chain[0]] = (GroupLayout(first.layer, name, first.parent, members), "joint",
                                tuple(range(len(members))))
            absorbed.update(chain[1:])
    return [merged.get(pos, unit) for pos, unit in enumerate(units) if pos not in absorbed]


def _entries(layout, units, *, ratio: float | None, rank: int | None, only_if_smaller: bool = True,
             keep_slow: float | None = None) -> list[PlanEntry]:
    entries = []
    for g, structure, idx in units:
        members = tuple(g.members[i] for i in idx)
        d_outs, d_in = tuple(m.d_out for m in members), g.d_in
        before = sum(d * d_in for d in d_outs)
        names = tuple(m.name for m in members)
        if structure == "keep":
            entries.append(PlanEntry(g.layer, g.group, "keep", names, d_outs, d_in, g.parent, None, before, before))
            continue
        limit = max_rank(d_outs, d_in)
        if rank is not None:
            if rank > limit:
                raise JointRankError(
                    f"--rank {rank} exceeds min(d_out, d_in) = {limit} of {' + '.join(names)} ({sum(d_outs)}x{d_in})"
                )
            k = rank
        else:
            k = max(1, min(limit, round(ratio * limit)))
        after = joint_params(d_outs, d_in, k)
        if after >= before and only_if_smaller:
            note = f"rank {k} would not reduce parameters ({after:,} >= {before:,} dense): kept dense"
            entries.append(PlanEntry(g.layer, g.group, "keep", names, d_outs, d_in, g.parent, None, before, before, note))
            continue
        cost = unit_cost(d_outs, d_in, k, span=span_of(names))
        verdict = cost.verdict(keep_slow or 0.0)
        macs = f"{cost.factorised_macs:,} vs {cost.dense_macs:,} multiply-adds/token"
        if verdict and keep_slow is not None:
            note = f"rank {k} would be {verdict} ({macs}): kept dense"
            entries.append(PlanEntry(g.layer, g.group, "keep", names, d_outs, d_in, g.parent, None, before, before, note))
            continue
        note = f"modelled {cost.verdict()}: {macs}" if cost.verdict() else ""
        entries.append(PlanEntry(g.layer, g.group, structure, names, d_outs, d_in, g.parent, k, before, after, note))
    return entries


def _solve_ratio(layout: ModelLayout, config: JointRankConfig, units) -> float:
    """The largest approximation ratio whose plan removes at least the target fraction of the scope's parameters."""
    scope_total = layout.params_total if config.scope == "model" else layout.params_decoder

    def reduction(r: float) -> float:
        entries = _entries(layout, units, ratio=r, rank=None, only_if_smaller=config.only_if_smaller,
                           keep_slow=config.keep_slow)
        return sum(e.params_before - e.params_after for e in entries) / scope_total

    lo, hi = 1e-9, 1.0  # reduction is non-increasing in r
    best = reduction(lo)
    if best < config.target:
        raise JointRankError(
            f"this structure cannot remove {config.target:.1%} of the {config.scope}'s parameters: even at rank 1 "
            f"it removes {best:.1%}. Lower --target, widen --layers, add groups, or use --scope decoder"
        )
    if reduction(hi) >= config.target:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if reduction(mid) >= config.target:
            lo = mid
        else:
            hi = mid
    return lo
