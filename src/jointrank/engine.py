"""The one unit engine: a unit's weights in, its factors and a record of what was done out.

Every run path goes through `run_unit`: the in-memory path (weights from the model, factors installed back into
it), the calibrated path (the same, with the unit's input statistics) and streaming, local or Ray (weights read
from safetensors, factors named by format.unit_tensors and written to a shard). The paths differ only in where the
weights come from and where the factors go, so a method, a solver setting or a check added here reaches all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import methods
from .finite import check_factors
from .format import structure_of
from .linalg import Factors, Solver


@dataclass
class UnitResult:
    layer: int
    group: str
    structure: str  # separate | joint
    members: tuple[str, ...]
    rank: int
    energy_kept: float
    rel_error: float
    member_rel_errors: list[float]
    solver: str = ""  # the solver that ran (Factors.solver); empty for methods that do not say

    def to_record(self, seconds: float | None = None) -> dict:
        """Plain JSON-ready form (a manifest's or a progress file's unit record)."""
        d = dict(vars(self))
        d["members"] = list(d["members"])
        if seconds is not None:
            d["seconds"] = seconds
        return d

    @classmethod
    def from_record(cls, d: dict) -> "UnitResult":
        return cls(d["layer"], d["group"], structure_of(d), tuple(d["members"]), d["rank"], d["energy_kept"],
                   d["rel_error"], d["member_rel_errors"], d.get("solver", ""))


def run_unit(entry, weights: list, method, *, solver: Solver | str = "auto",
             stats=None) -> tuple[Factors, UnitResult, float]:
    """Factorise one plan entry's weights with `method` (a method's typed settings, or a spec such as "svd");
    refuse non-finite factors.

    Returns the factors (float32, on the solver's device), the unit's record and the seconds it took."""
    start = time.perf_counter()
    factors = methods.factorise(method, weights, entry.rank, stats=stats, solver=solver)
    check_factors(entry, factors)  # never install or write NaN/Inf factors
    result = UnitResult(entry.layer, entry.group, entry.structure, tuple(entry.members), entry.rank,
                        factors.energy_kept, factors.rel_error, factors.member_rel_errors, factors.solver)
    return factors, result, time.perf_counter() - start
