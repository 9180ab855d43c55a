"""What to compress and how: a CompressionPlan is a plain value computed from shapes alone, before any weight changes.

A JointRankConfig says *how to choose* (per group a method and the layers it applies to, and one rank rule);
jointrank.planning.make_plan turns it and a ModelLayout into a CompressionPlan that says *exactly what* happens: for
every group of every layer, keep / separate / joint, the rank, and the parameters before and after. The plan can be
printed, saved, diffed and tested without touching a weight. This module holds those values and their validation;
the planners live in jointrank.planning.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar

from .architectures import GROUP_NAMES, JOINABLE
from .errors import JointRankError
from .format import structure_of
from .linalg import SOLVERS, Solver, joint_params, max_rank

STRUCTURES = ("keep", "separate", "joint")  # what a plan does with a group (not how it factorises: that is the method)
SCOPES = ("model", "decoder")
ALLOCATIONS = ("uniform", "global", "loss")
ALLOCATION_PRIORS = ("flat", "depth", "residual")  # global allocation's data-free sensitivity prior (planning.allocation)
CONFIG_VERSION = 1


@dataclass(frozen=True)
class UniformAllocation:
    """One approximation ratio (or rank) for every factorised unit, solved for --target if given."""

    version: ClassVar[int] = 1


@dataclass(frozen=True)
class GlobalAllocation:
    """Every unit's rank (or dense) chosen together under one budget from the weights' spectra, each unit's lost
    energy weighted by a data-free prior (planning.allocation)."""

    prior: str = "flat"  # flat | depth | residual
    version: ClassVar[int] = 1


@dataclass(frozen=True)
class GroupRule:
    structure: str  # keep | separate | joint
    layers: str = "all"  # a layer spec, see parse_layers


@dataclass
class JointRankConfig:
    """How to compress: serialises to a dict and back, and is stored in every checkpoint's manifest."""

    rules: dict[str, GroupRule] = field(default_factory=dict)  # group name -> rule; absent groups are kept
    ratio: float | None = None  # approximation ratio k / min(d_out, d_in), the same for every factorised unit
    rank: int | None = None  # or one absolute rank
    target: float | None = None  # or: solve one ratio so this fraction of the scope's parameters is removed
    scope: str = "model"  # what --target is a fraction of: the whole model or the decoder layers
    solver: str = "auto"
    only_if_smaller: bool = True  # keep a unit dense when its factors would not be smaller than its weights
    preset: str | None = None
    version: int = CONFIG_VERSION
    # how each unit is factorised: a name in jointrank.methods (svd, balanced:heads, svd_llm, ...), or a method's
    # settings value (e.g. SVDLLMSettings(damping=0.05)), which is stored as its name plus method_params
    method: str = "svd"
    # uniform: one ratio everywhere; global: ranks per unit from the weights' spectra (planning.allocation); loss:
    # structure and ranks per group from the estimated loss on calibration text (planning.loss)
    allocation: str = "uniform"
    keep_slow: float | None = None  # keep dense a unit whose modelled cost is not this fraction below dense (unit_cost)
    allocation_prior: str = "flat"  # global allocation only: flat | depth | residual (planning.allocation)
    method_params: dict = field(default_factory=dict)  # the method's hyperparameters that differ from its defaults
    seed: int | None = None  # the randomized solver's seed (None: linalg.DEFAULT_SEED)
    # cross-layer shared bases: every factorised unit of `share_layers` adjacent layers (the same group and member
    # kind, e.g. o_proj of layers 4 and 5, or joint gate/up of layers 4 and 5) stacked and factorised once, one input
    # basis stored for all of them (Basis Sharing, arXiv 2410.03765, here also for the paper's joint groups). 1: none
    share_layers: int = 1
    share_groups: list[str] | None = None  # the groups whose units share across layers (None: every group)

    def __post_init__(self):
        # typed values, in the spirit of torchao's configs, are stored as the plain fields they set
        if isinstance(self.solver, Solver):
            if self.solver.device is not None:
                raise JointRankError("a Solver's device is where a run happens, not a compression setting: pass "
                                     "device= to compress_ (or --device)")
            self.seed = self.solver.seed if self.solver.seed is not None else self.seed
            self.solver = self.solver.name
        if isinstance(self.allocation, GlobalAllocation):
            self.allocation, self.allocation_prior = "global", self.allocation.prior
        elif isinstance(self.allocation, UniformAllocation):
            self.allocation = "uniform"
        if not isinstance(self.method, str):  # a settings value: its name, and every setting as a parameter
            from .methods import method_of

            settings, self.method = self.method, method_of(self.method).name
            self.method_params = {**dataclasses.asdict(settings), **self.method_params}

    def solver_settings(self, device=None) -> Solver:
        """How each unit is solved: the solver, its seed (randomized solver) and the device of this run."""
        return Solver(self.solver, self.seed, device)

    def allocation_settings(self) -> "UniformAllocation | GlobalAllocation":
        return GlobalAllocation(self.allocation_prior) if self.allocation == "global" else UniformAllocation()

    def method_settings(self):
        """The method with every hyperparameter, typed (defaults filled in)."""
        from .methods import settings_for

        return settings_for(self.method, self.method_params)

    def to_dict(self) -> dict:
        """Every setting, plus the method's full settings with their version (method_settings: what a manifest
        records about how the factors were made; derived, so from_dict only checks its version)."""
        from .methods import settings_dict

        d = dataclasses.asdict(self)
        d["rules"] = {g: dataclasses.asdict(r) for g, r in self.rules.items()}
        d["method_settings"] = settings_dict(self.method, self.method_params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "JointRankConfig":
        d = dict(d)
        if d.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise JointRankError(f"config version {d.get('version')} is not supported by this jointrank")
        d["rules"] = {g: GroupRule(structure_of(r), r.get("layers", "all")) for g, r in d.get("rules", {}).items()}
        stored = d.pop("method_settings", None)
        if stored is not None:
            from .methods import settings_for

            ours = type(settings_for(d.get("method", "svd"))).version
            if stored.get("version", 1) > ours:
                raise JointRankError(f"method {stored.get('name')!r} settings version {stored.get('version')} were "
                                     f"written by a newer jointrank (this one reads up to {ours}); upgrade jointrank")
        # Checkpoints from before the prior was a setting: a uniform plan's config has no prior (the default is
        # right), a global plan's recorded the one it used under this same key.
        return cls(**d)


# The paper's LLaMA-7B settings (arXiv 2402.16319, Table 1): ~10% = separate rank-k on W_Q and W_K of every layer;
# ~20% = that plus joint rank-k of W_gate/W_up in the last 22 of 32 layers. Kept as structure on any depth.
PRESETS: dict[str, JointRankConfig] = {
    "paper-10": JointRankConfig(rules={"qk": GroupRule("separate")}, target=0.10, preset="paper-10"),
    "paper-20": JointRankConfig(
        rules={"qk": GroupRule("separate"), "gate_up": GroupRule("joint", "last:22/32")}, target=0.20, preset="paper-20"
    ),
}


@dataclass(frozen=True)
class UnitCost:
    """Per-token cost of one unit, dense vs factorised at rank k: multiply-adds (compute-bound prefill) and weights
    read (memory-bound decode; bytes = this x the dtype's size, the same for both, so the ratio is dtype-free)."""

    dense_macs: int
    factorised_macs: int
    dense_params: int
    factorised_params: int

    @property
    def speedup(self) -> float:
        return self.dense_macs / self.factorised_macs

    def verdict(self, margin: float = 0.0) -> str:
        """'' if the factorised unit is cheaper than dense in both measures by more than `margin`, else why not."""
        slower, larger = self.factorised_macs >= self.dense_macs, self.factorised_params >= self.dense_params
        if slower or larger:
            return " and ".join(w for w, bad in (("slower", slower), ("larger", larger)) if bad) + " than dense"
        saving = 1 - max(self.factorised_macs / self.dense_macs, self.factorised_params / self.dense_params)
        return f"less than {margin:.0%} cheaper than dense" if saving < margin else ""


def span_of(members) -> int:
    """How many decoder layers a unit's members (module names) sit in: the members of one layer share a parent."""
    return len({m.rsplit(".", 1)[0] for m in members})


def unit_cost(d_outs: tuple[int, ...] | list[int], d_in: int, rank: int, *, shared_projection: bool = True,
              span: int = 1) -> UnitCost:
    """Dense: Σd_out·d_in multiply-adds per token. Rank k: k·d_in for the projection x Bᵀ (once for a joint group,
    as modules.SharedBasis computes it once; per member if it were not shared) + k·Σd_out for the output factors.
    With the projection shared, multiply-adds per token equal the weights stored, so "slower" and "larger" agree;
    real kernels lose some efficiency on two thin matmuls, which is what a keep_slow margin is for. A basis shared
    by `span` layers is stored once but projects each layer's own input: span projections per token."""
    dense = sum(d_outs) * d_in
    projections = span if shared_projection else len(d_outs)
    return UnitCost(dense, rank * d_in * projections + rank * sum(d_outs), dense, joint_params(d_outs, d_in, rank))


@dataclass(frozen=True)
class PlanEntry:
    """One factorisation unit (or one kept group): members sharing one decomposition."""

    layer: int
    group: str
    structure: str  # keep | separate | joint
    members: tuple[str, ...]
    d_outs: tuple[int, ...]
    d_in: int
    parent: str
    rank: int | None
    params_before: int  # weights only; biases are kept exact and counted in the model totals
    params_after: int
    note: str = ""

    @property
    def approximation_ratio(self) -> float | None:
        return None if self.rank is None else self.rank / max_rank(self.d_outs, self.d_in)

    @property
    def span(self) -> int:
        """How many decoder layers share this unit's basis: 1, or more for a cross-layer unit (members of one
        layer always share one parent module, so the layers are the distinct parents)."""
        return span_of(self.members)


@dataclass(frozen=True)
class CompressionPlan:
    model_type: str
    num_layers: int
    entries: tuple[PlanEntry, ...]
    params_total_before: int
    params_decoder_before: int
    config: dict
    ratio: float | None = None  # the approximation ratio used (solved for, when a target was given)

    @property
    def params_removed(self) -> int:
        return sum(e.params_before - e.params_after for e in self.entries)

    @property
    def params_total_after(self) -> int:
        return self.params_total_before - self.params_removed

    @property
    def params_decoder_after(self) -> int:
        return self.params_decoder_before - self.params_removed

    @property
    def factorised(self) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if e.structure != "keep")

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "params_total_before": self.params_total_before,
            "params_decoder_before": self.params_decoder_before,
            "config": self.config,
            "ratio": self.ratio,
            "entries": [dataclasses.asdict(e) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionPlan":
        entries = tuple(
            PlanEntry(**{**{k: v for k, v in e.items() if k != "method"}, "structure": structure_of(e),
                         "members": tuple(e["members"]), "d_outs": tuple(e["d_outs"])}) for e in d["entries"]
        )
        return cls(d["model_type"], d["num_layers"], entries, d["params_total_before"], d["params_decoder_before"],
                   d["config"], d.get("ratio"))


def check_plan_fits(plan: CompressionPlan, layout) -> None:
    """A ready plan (made for this model, or loaded from a file) must name this model's modules with their shapes."""
    shapes = {m.name: (m.d_out, m.d_in) for g in layout.groups for m in g.members}
    for e in plan.entries:
        for name, d_out in zip(e.members, e.d_outs):
            if shapes.get(name) != (d_out, e.d_in):
                raise JointRankError(f"the plan does not fit this model: {name} is {shapes.get(name)}, "
                                     f"the plan expects {(d_out, e.d_in)}")


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'all', 'first:N', 'last:N', 'last:22/32' (that fraction of the layers, rounded), or '0-5,20-31'."""
    text = spec.strip().lower()
    match = re.fullmatch(r"(first|last):(\d+)(?:/(\d+))?", text)
    if text == "all":
        chosen = list(range(num_layers))
    elif match:
        n = int(match.group(2))
        if match.group(3):
            if int(match.group(3)) == 0 or n > int(match.group(3)):
                raise JointRankError(f"layer spec {spec!r}: fraction must be between 0 and 1")
            n = round(num_layers * n / int(match.group(3)))
        if n > num_layers:
            raise JointRankError(f"layer spec {spec!r} asks for {n} layers; the model has {num_layers}")
        if n == 0:  # a group flag that selects nothing would write a checkpoint with no low-rank unit
            raise JointRankError(f"layer spec {spec!r} selects no layers; give at least 1 (or drop the group flag)")
        chosen = list(range(n)) if match.group(1) == "first" else list(range(num_layers - n, num_layers))
    elif re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        chosen = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi or lo)
            if lo > hi or hi >= num_layers:
                raise JointRankError(f"layer spec {spec!r}: {part} is outside layers 0-{num_layers - 1}")
            chosen.extend(range(lo, hi + 1))
        chosen = sorted(set(chosen))
    else:
        raise JointRankError(
            f"unknown layer spec {spec!r}; use all, first:N, last:N, last:A/B (a fraction of the layers) or 0-5,20-31"
        )
    return chosen


def validate(config: JointRankConfig) -> None:
    rules = [config.ratio is not None, config.rank is not None, config.target is not None]
    if sum(rules) != 1:
        raise JointRankError("give exactly one rank rule: --ratio, --rank or --target (or a preset)")
    if config.ratio is not None and not 0 < config.ratio <= 1:
        raise JointRankError(f"--ratio must be in (0, 1]; got {config.ratio}")
    if config.rank is not None and config.rank < 1:
        raise JointRankError(f"--rank must be at least 1; got {config.rank}")
    if config.target is not None and not 0 < config.target < 1:
        raise JointRankError(f"--target is a fraction of parameters to remove, in (0, 1); got {config.target}")
    if config.scope not in SCOPES:
        raise JointRankError(f"--scope must be one of {', '.join(SCOPES)}; got {config.scope!r}")
    if config.solver not in SOLVERS:
        raise JointRankError(f"--solver must be one of {', '.join(SOLVERS)}; got {config.solver!r}")
    from .methods import settings_for

    settings_for(config.method, config.method_params)  # unknown method, option or hyperparameter: one clear error
    if config.keep_slow is not None and not 0 <= config.keep_slow < 1:
        raise JointRankError(f"--keep-slow margin must be in [0, 1); got {config.keep_slow}")
    if config.allocation not in ALLOCATIONS:
        raise JointRankError(f"--allocation must be one of {', '.join(ALLOCATIONS)}; got {config.allocation!r}")
    if config.allocation_prior not in ALLOCATION_PRIORS:
        raise JointRankError(f"--allocation-prior must be one of {', '.join(ALLOCATION_PRIORS)}; got "
                             f"{config.allocation_prior!r}")
    if config.allocation in ("global", "loss") and config.target is None:
        raise JointRankError(f"--allocation {config.allocation} chooses every rank from a parameter budget: give "
                             "--target (or a preset), not --ratio or --rank")
    for group, rule in config.rules.items():
        if group not in GROUP_NAMES:
            raise JointRankError(f"unknown group {group!r}; groups are {', '.join(GROUP_NAMES)}")
        if rule.structure not in STRUCTURES:
            raise JointRankError(f"{group}: unknown structure {rule.structure!r}; use {', '.join(STRUCTURES)}")
        if rule.structure == "joint" and group not in JOINABLE:
            raise JointRankError(f"{group} has one member, so it cannot be joint; use separate")
    if isinstance(config.share_layers, bool) or not isinstance(config.share_layers, int) or config.share_layers < 1:
        raise JointRankError(f"--share-layers must be a whole number of layers, at least 1; got {config.share_layers!r}")
    if config.share_groups is not None:
        unknown = [g for g in config.share_groups if g not in GROUP_NAMES]
        if unknown or not config.share_groups:
            raise JointRankError(f"--share-groups takes group names ({', '.join(GROUP_NAMES)}); got "
                                 f"{','.join(config.share_groups) or 'nothing'}")
        if config.share_layers < 2:
            raise JointRankError("--share-groups says which groups share a basis across layers: give --share-layers N "
                                 "(N >= 2) too")
    if config.share_layers > 1:
        if config.allocation == "loss":
            raise JointRankError("--share-layers with --allocation loss is not supported: loss-aware allocation scores "
                                 "units of one layer; use --allocation global or uniform with shared bases")
        from .methods import parse

        method, _ = parse(config.method)
        if method.sequential:
            raise JointRankError(f"--share-layers needs a method that factorises weights from statistics of the dense "
                                 f"model; {method.name} is sequential (each layer is compressed before the next is "
                                 "measured), so a basis cannot wait for the next layer")
    if not any(r.structure != "keep" for r in config.rules.values()):
        raise JointRankError("nothing to compress: give a preset or a method for at least one group (e.g. --qk joint)")
