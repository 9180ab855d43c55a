"""Run a data-aware method over a plan: statistics layer by layer, factorise each unit, install it.

Called by compress.compress_ when the plan's method needs calibration. Besides the usual per-unit results it
records, for every unit, the relative output error on the calibration inputs it was factorised with, for the
method and for plain SVD at the same rank: the quantity the data-aware methods exist to reduce.
"""

from __future__ import annotations

from collections import defaultdict

from tqdm.auto import tqdm

from ..architectures import describe
from ..engine import run_unit
from ..errors import JointRankError
from ..linalg import Solver, joint_rank_k
from . import parse, settings_dict, settings_for
from .calibration import Calibration, layerwise, pooled
from .common import output_error


def compress_calibrated(model, plan, calibration: Calibration | None, *, solver, install, progress: bool = True):
    """install(entry, factors) puts one unit's factors into the model; returns (UnitResults, extra)."""
    spec = plan.config.get("method", "svd")
    method, _ = parse(spec)
    solver = Solver.of(solver)
    settings = settings_for(spec, plan.config.get("method_params"))
    if calibration is None:
        raise JointRankError(f"method {method.name!r} needs calibration text: give --calibration FILE")
    # one statistic per group and layer: all members of a group read the same input. A cross-layer unit reads
    # the inputs of several layers: it is factorised at its last layer, from their statistics pooled
    group_of = describe(model).group_of()
    watch: dict[int, dict[str, str]] = defaultdict(dict)
    finish_at = defaultdict(list)  # layer -> (unit, the (layer, group) statistics it pools)
    users = defaultdict(int)  # statistic -> units still to use it: each is freed after its last use (d_in² floats)
    for entry in plan.factorised:
        keys = list(dict.fromkeys((group_of[name].layer, group_of[name].group) for name in entry.members))
        for name in entry.members:
            watch[group_of[name].layer].setdefault(group_of[name].group, name)
        for key in keys:
            users[key] += 1
        finish_at[max(layer for layer, _ in keys)].append((entry, keys))
    measured: dict[tuple[int, str], object] = {}
    done: list = []
    errors: list[dict] = []
    bar = tqdm(total=len(plan.factorised), desc=f"{method.name} (calibrated)", unit="unit", disable=not progress)

    def on_layer(index, stats):
        measured.update({(index, group): unit_stats for group, unit_stats in stats.items()})
        for entry, keys in finish_at[index]:
            modules = [model.get_submodule(name) for name in entry.members]
            weights = [m.weight.detach() for m in modules]
            unit_stats = pooled([measured[key] for key in keys])
            for key in keys:
                users[key] -= 1
                if not users[key]:
                    del measured[key]
            factors, result, _ = run_unit(entry, weights, settings, stats=unit_stats, solver=solver)
            plain = joint_rank_k(weights, entry.rank, solver=solver.name, seed=solver.seed)
            errors.append({"layer": entry.layer, "group": entry.group, "members": list(entry.members),
                           "rank": entry.rank, "tokens": unit_stats.tokens,
                           "calib_rel_error": output_error(weights, factors, unit_stats.second_moment),
                           "svd_calib_rel_error": output_error(weights, plain, unit_stats.second_moment)})
            install(entry, factors)
            done.append(result)
            bar.update()

    try:
        layerwise(model, calibration, dict(watch), on_layer, sequential=method.sequential)
    finally:
        bar.close()
    extra = {"method": spec, "method_settings": settings_dict(settings), "sequential": method.sequential, "calibration_tokens": calibration.tokens,
             "calibration_source": calibration.source, "calibration_seed": calibration.seed,
             **({"calibration_provenance": calibration.provenance} if calibration.provenance else {}),
             "calibration_errors": errors}
    return done, extra
