"""Experiment 1 (the paper's Table 1): dense vs the paper's structures at 10% and 20% reduction, and the same budgets
with separate rank-k everywhere and joint rank-k everywhere, for both scopes (whole model, decoder layers).

Structures (ranks solved by the core planner so the target fraction of the scope's parameters is removed):
  paper     paper-10 at 10% (separate Q, K), paper-20 at 20% (+ joint gate/up in the last 22/32 of the layers)
  separate  every group (Q, K, V, O, gate, up, down) separate
  joint     Q/K joint, gate/up joint, V, O, down separate
A structure that cannot reach a target (on Gemma-3-270M the embedding is 63% of the model, so Q and K alone cannot
remove 10% of it) is recorded with the planner's reason instead of a number. The compressed model is the core plan
applied as dense rank-k weights (the same function `compress_` builds; see common.py).
"""

from __future__ import annotations

import dataclasses
import time

from jointrank import PRESETS, GroupRule, JointRankConfig, JointRankError, make_plan
from jointrank.architectures import describe
from .common import Part, PplProbe, RankSweep, Unit, load, out_dir, paired, parse_floats, set_threads, stamp, write_json
from .denoise import zero_shot

NAME = "table1"
EVERY = ("qk", "v", "o", "gate_up", "down")


def config_for(structure: str, target: float, scope: str) -> JointRankConfig:
    if structure == "paper":
        preset = PRESETS["paper-10"] if target <= 0.15 else PRESETS["paper-20"]
        return dataclasses.replace(preset, target=target, scope=scope, rules=dict(preset.rules))
    if structure == "separate":
        rules = {g: GroupRule("separate") for g in EVERY}
    elif structure == "joint":
        rules = {g: GroupRule("joint" if g in ("qk", "gate_up") else "separate") for g in EVERY}
    else:
        raise JointRankError(f"unknown structure {structure!r}; choose paper, separate or joint")
    return JointRankConfig(rules=rules, target=target, scope=scope)


def units_from_plan(plan) -> tuple[list[Unit], dict[int, int]]:
    units, ranks = [], {}
    for e in plan.factorised:
        ranks[len(units)] = e.rank
        label = "+".join(m.rsplit(".", 1)[1].removesuffix("_proj") for m in e.members)
        units.append(Unit(e.layer, e.group, label, tuple(Part(m) for m in e.members)))
    return units, ranks


def run(model_spec: str, *, targets=(0.1, 0.2), scopes=("model", "decoder"), structures=("paper", "separate", "joint"),
        tasks=(), limit: int = 200, seqlen: int = 512, max_windows: int = 4, window_seed: int = 0, data_dir=None,
        text: str | None = None, evaluate: bool = True, out: str | None = None, command: str = "", model=None,
        tokenizer=None) -> dict:
    started = time.perf_counter()
    set_threads()
    targets = parse_floats(targets, "--targets")
    if model is None:
        model, tokenizer = load(model_spec)
    layout = describe(model)
    probe = PplProbe.build(tokenizer, text=text, data_dir=data_dir, seqlen=seqlen, max_windows=max_windows,
                           seed=window_seed) if evaluate else None
    dense = {"params_total": layout.params_total, "params_decoder": layout.params_decoder}
    if probe:
        dense["wikitext2"] = probe.measure(model)
    if tasks:
        dense["zero_shot"] = zero_shot(model, tokenizer, list(tasks), data_dir=data_dir, limit=limit)
    rows = []
    for scope in scopes:
        for target in targets:
            for structure in structures:
                config = config_for(structure, target, scope)
                row = {"scope": scope, "target": target, "structure": structure,
                       "preset": config.preset, "config": config.to_dict()}
                try:
                    plan = make_plan(layout, config)
                except JointRankError as exc:
                    rows.append({**row, "infeasible": str(exc)})
                    continue
                units, ranks = units_from_plan(plan)
                row.update(ratio=plan.ratio, params_total_after=plan.params_total_after,
                           params_decoder_after=plan.params_decoder_after,
                           reduction_model=1 - plan.params_total_after / plan.params_total_before,
                           reduction_decoder=1 - plan.params_decoder_after / plan.params_decoder_before,
                           units=len(units))
                sweep = RankSweep(model, units)
                stats = sweep.apply(ranks=ranks)
                if stats["params_factored"] != sum(e.params_after for e in plan.factorised):
                    raise AssertionError("sweep and plan disagree on parameter counts")  # Eq. 9 on both sides
                if probe:
                    m = probe.measure(model)
                    row["wikitext2"] = {"ppl": m["ppl"], "window_nll": m["window_nll"],
                                        **paired(dense["wikitext2"], m)}
                if tasks:
                    row["zero_shot"] = zero_shot(model, tokenizer, list(tasks), data_dir=data_dir, limit=limit)
                sweep.restore()
                rows.append(row)
    result = {"experiment": NAME, "model": model_spec, "targets": targets, "scopes": list(scopes),
              "structures": list(structures), "tasks": list(tasks), "limit": limit if tasks else None,
              "probe": probe.describe() if probe else None, "dense": dense, "rows": rows,
              "meta": stamp(command, started)}
    target_dir = out_dir(NAME, out)
    tag = "_".join(scopes) if list(scopes) != ["model", "decoder"] else ""
    write_json(target_dir / (f"{NAME}_{tag}.json" if tag else f"{NAME}.json"), result)
    return result
