"""How long a compression will take on this machine, estimated before any weight changes (`jointrank plan`).

Every phase is scaled from a short measurement on the loaded model: one forward pass of a calibration window, a
few sampling steps, one input second-moment product per input width (the data-aware statistics' main cost on wide
layers: a d_in² product per token), and one factorisation of the plan's costliest unit as its method does it. The
multipliers below (how many forward passes each phase costs) are what the phases do, not fitted numbers; they are
checked against measured phase times only by hand so far (the closing notes of the sessions that changed them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

WINDOW = 512


@dataclass
class Estimate:
    phases: dict[str, float]  # seconds per phase

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    def render(self) -> str:
        parts = ", ".join(f"{name} {_fmt(s)}" for name, s in self.phases.items() if s > 0)
        return f"estimated time on this machine: {_fmt(self.total)} ({parts}; rough, from a short measurement here)"


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


@torch.no_grad()
def _forward_seconds(model, seqlen: int = WINDOW) -> float:
    """Wall time of one full forward pass (logits included) of one window, median of 2 after a warm-up."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[0]


def _sampling_seconds(model, tokenizer, tokens: int) -> float:
    from .methods.selfgen import SamplingSettings, sample_windows

    settings = SamplingSettings()
    steps = 6
    t = time.perf_counter()
    # one batch exactly (no redrawing): the estimate is per sampled token; redraws, rare, are not in it
    sample_windows(model, tokenizer, settings.batch_size, steps, replace(settings, max_repeated_share=1.0),
                   progress=False)
    per_step = (time.perf_counter() - t) / (steps - 1)
    windows = -(-tokens // settings.seqlen)
    batches = -(-windows // settings.batch_size)
    return per_step * settings.seqlen * batches


def _work(rows: int, d_in: int, data_aware: bool) -> int:
    """Flops, up to a constant, of one unit's factorisation: its SVD; a data-aware method adds a d_in x d_in
    Cholesky factor and float64 products of the weights with it (whitening, then the output errors recorded)."""
    svd = rows * d_in * min(rows, d_in)
    return svd + d_in**3 // 3 + 4 * rows * d_in**2 if data_aware else svd


def _factorise_seconds(model, plan, method_spec: str, solver: str) -> float:
    """One factorisation of the costliest unit as `method_spec` does it (a data-aware method: from an identity
    second moment, the same arithmetic as a measured one, plus the plain SVD and the two output errors the
    calibrated path records per unit), timed, scaled to every unit by _work."""
    from . import methods

    units = list(plan.factorised)
    if not units:
        return 0.0
    method, _ = methods.parse(method_spec)
    aware = method.needs_calibration

    def work(e):
        return _work(sum(e.d_outs), e.d_in, aware)

    largest = max(units, key=work)
    weights = [model.get_submodule(n).weight.detach() for n in largest.members]
    t = time.perf_counter()
    if aware:
        from .linalg import joint_rank_k
        from .methods.calibration import InputStats
        from .methods.common import output_error

        stats = InputStats(largest.d_in)
        stats.second_moment += torch.eye(largest.d_in, dtype=torch.float64)
        stats.mean_abs += 1.0
        stats.tokens = 1
        factors = methods.factorise(method_spec, weights, largest.rank, stats=stats, solver=solver)
        plain = joint_rank_k(weights, largest.rank, solver=solver)
        for made in (factors, plain):
            output_error(weights, made, stats.second_moment)
    else:
        methods.factorise(method_spec, weights, largest.rank, solver=solver)
    seconds = time.perf_counter() - t
    return seconds * sum(work(e) for e in units) / work(largest)


def _moment_seconds(widths: list[int], device, timed: dict[int, float]) -> float:
    """Seconds to add one window's inputs to the second moments of inputs of these widths (one per watched group
    and layer): InputStats.add timed once per distinct width, up to 2048 wide; wider ones scaled by d_in². `timed`
    keeps each width's seconds across calls (the planning pass and the statistics pass read the same widths)."""
    from .methods.calibration import InputStats

    for d in sorted(set(widths) - set(timed)):
        probe = min(d, 2048)
        if probe not in timed:
            x = torch.randn(WINDOW, probe, generator=torch.Generator().manual_seed(0)).to(device)
            stats = InputStats(probe)
            stats.add(x)  # warm-up
            t = time.perf_counter()
            stats.add(x)
            timed[probe] = time.perf_counter() - t
        timed[d] = timed[probe] * (d / probe) ** 2
    return sum(timed[d] for d in widths)


def _watched_widths(entries) -> list[int]:
    """The input width of every (layer, group) whose statistics a pass accumulates: one per group, whatever the
    number of units in it (members of a group read one input)."""
    return list({(e.layer, e.group): e.d_in for e in entries}.values())


def _curve_work(rows: int, d_in: int) -> int:
    """Flops, up to a constant, of one loss curve (planning.loss.option_curves): a stack taller than wide forms its
    two d_in x d_in Grams, whitens them and decomposes one; a wider one forms W C Wᵀ and decomposes it."""
    if rows > d_in:
        return 2 * rows * d_in**2 + 8 * d_in**3
    return rows * d_in**2 + 2 * rows**2 * d_in + 4 * rows**3


def _loss_planning_seconds(model, config, windows: int, forward: float, timed: dict[int, float]) -> float:
    """--allocation loss, before anything is factorised: one forward and backward pass per window for the output
    Fisher (about three forwards), a statistics pass over every group the rules allow, and one loss curve per
    candidate (each group stacked, if joinable, and each member alone), timed on the costliest and scaled."""
    from .architectures import describe
    from .planning.loss import candidate_options, loss_curve
    from .planning.uniform import plan_units

    groups = {(g.layer, g.group): g for g, s, _ in plan_units(describe(model), config) if s != "keep"}
    if not groups:
        return 0.0
    # the options loss_curves scores: (rows, d_in, member names)
    candidates = [(sum(g.members[i].d_out for i in idx), g.d_in, [g.members[i].name for i in idx])
                  for g in groups.values() for idx in candidate_options(g)]

    def work(c):
        return _curve_work(c[0], c[1])

    curves = 0.0
    if candidates:
        costliest = max(candidates, key=work)
        rows, d_in, names = costliest
        weights = [model.get_submodule(n).weight.detach() for n in names]
        t = time.perf_counter()
        loss_curve(weights, torch.eye(d_in, dtype=torch.float64), torch.ones(rows, dtype=torch.float64), 1)
        curves = (time.perf_counter() - t) * sum(work(c) for c in candidates) / work(costliest)
    device = next(model.parameters()).device
    widths = [g.d_in for g in groups.values()]
    return windows * (3.0 * forward + forward + _moment_seconds(widths, device, timed)) + curves


def distillation_memory(plan, element_bytes: int = 4) -> tuple[int, int]:
    """(trainable factor parameters, the bytes distillation adds for them): each factor's gradient and Adam's two
    moments, three copies of every trainable factor in the model's precision (heal.trainable_factors: every factor
    of every factorised unit, biases aside). Arithmetic on the plan, not a measurement; activations come on top
    (one window of 512 at a time). Measured beside it: results/scale/heal_probe.json (peak RSS of distillation)."""
    trainable = sum(e.params_after for e in plan.factorised)
    return trainable, 3 * element_bytes * trainable


def estimate(model, tokenizer, plan, *, method: str, solver: str, calibration: str | None, calibration_tokens: int,
             heal: str, heal_steps: int, config=None) -> Estimate:
    """Seconds per phase of `jointrank compress` with these settings (see the module docstring). With `config`
    (its allocation "loss"), the loss-aware planning compress runs before factorising is estimated too."""
    from .heal import parse_heal
    from .methods import parse
    from .methods.selfgen import parse_spec

    forward = _forward_seconds(model)
    windows = -(-calibration_tokens // WINDOW)
    data_aware = parse(method)[0].needs_calibration
    do_refit, do_distill = parse_heal(heal)
    phases = {}
    if calibration is not None and parse_spec(calibration) is not None and (data_aware or do_refit or do_distill):
        phases["sampling"] = _sampling_seconds(model, tokenizer, calibration_tokens) if tokenizer else 0.0
    moments: dict[int, float] = {}  # seconds per window of one second-moment product, per input width
    if config is not None and config.allocation == "loss" and calibration is not None:
        phases["loss planning"] = _loss_planning_seconds(model, config, windows, forward, moments)
    # statistics: every window through every layer (twice when the method is sequential, LLM-ROM), and each window's
    # second-moment product for every group factorised
    if data_aware:
        device = next(model.parameters()).device
        passes = 2.0 if parse(method)[0].sequential else 1.0
        phases["statistics"] = windows * (passes * forward
                                          + _moment_seconds(_watched_widths(plan.factorised), device, moments))
    else:
        phases["statistics"] = 0.0
    phases["factorisation"] = _factorise_seconds(model, plan, method, solver)
    phases["refit"] = 3.0 * windows * forward if do_refit else 0.0  # teacher + student + student again
    # distillation: one teacher forward per window used (its states are kept), then per step a student forward and
    # a backward (about twice a forward)
    phases["distillation"] = (min(windows, heal_steps) + 3.0 * heal_steps) * forward if do_distill else 0.0
    return Estimate(phases)
