"""How long a compression will take on this machine, estimated before any weight changes (`jointrank plan`).

Every phase is scaled from a short measurement on the loaded model: one forward pass of a calibration window, a
few sampling steps, and one factorisation of the plan's largest unit. The multipliers below (how many forward
passes each phase costs) are what the phases do, not fitted numbers; bench/quality.py records the measured phase
times beside the estimate so the two can be compared.
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


def _factorise_seconds(model, plan, method_spec: str, solver: str) -> float:
    """One factorisation of the largest unit, timed, scaled to every unit by its rows x cols x min(rows, cols)."""
    from . import methods

    units = list(plan.factorised)
    if not units:
        return 0.0

    def work(e):
        rows = sum(e.d_outs)
        return rows * e.d_in * min(rows, e.d_in)

    largest = max(units, key=work)
    weights = [model.get_submodule(n).weight.detach() for n in largest.members]
    method, _ = methods.parse(method_spec)
    t = time.perf_counter()
    if method.needs_calibration:  # the data-aware methods' extra work is one d_in x d_in decomposition
        from .linalg import joint_rank_k

        joint_rank_k(weights, largest.rank, solver=solver)
    else:
        methods.factorise(method_spec, weights, largest.rank, solver=solver)
    seconds = time.perf_counter() - t
    factor = 2.0 if method.needs_calibration else 1.0
    return factor * seconds * sum(work(e) for e in units) / work(largest)


def distillation_memory(plan, element_bytes: int = 4) -> tuple[int, int]:
    """(trainable factor parameters, the bytes distillation adds for them): each factor's gradient and Adam's two
    moments, three copies of every trainable factor in the model's precision (heal.trainable_factors: every factor
    of every factorised unit, biases aside). Arithmetic on the plan, not a measurement; activations come on top
    (one window of 512 at a time). Measured beside it: results/scale/heal_probe.json (peak RSS of distillation)."""
    trainable = sum(e.params_after for e in plan.factorised)
    return trainable, 3 * element_bytes * trainable


def estimate(model, tokenizer, plan, *, method: str, solver: str, calibration: str | None, calibration_tokens: int,
             heal: str, heal_steps: int) -> Estimate:
    """Seconds per phase of `jointrank compress` with these settings (see the module docstring)."""
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
    # statistics: every window through every layer, twice when the method is sequential (LLM-ROM)
    phases["statistics"] = (2.0 if data_aware and parse(method)[0].sequential else 1.0) * windows * forward \
        if data_aware else 0.0
    phases["factorisation"] = _factorise_seconds(model, plan, method, solver)
    phases["refit"] = 3.0 * windows * forward if do_refit else 0.0  # teacher + student + student again
    # distillation: one teacher forward per window used (its states are kept), then per step a student forward and
    # a backward (about twice a forward)
    phases["distillation"] = (min(windows, heal_steps) + 3.0 * heal_steps) * forward if do_distill else 0.0
    return Estimate(phases)
