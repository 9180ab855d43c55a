"""One decoder layer of a streamed compression: read its tensors, run its units through the engine, write its shard.

A LayerJob is plain data, so it pickles to a Ray task; every executor (streaming.executors) ends up calling the
functions here, one unit or one layer at a time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import UnitResult, run_unit
from ..format import unit_tensors
from ..linalg import Solver
from .source import TensorSource

RAY_TASK_CPUS = 2  # CPUs each layer task asks Ray for; its BLAS threads follow (Ray sets OMP_NUM_THREADS)


@dataclass(frozen=True)
class StreamOptions:
    solver: str | None = None  # None: the plan's (JointRankConfig.solver), as the in-memory path uses
    seed: int | None = None  # None: the plan's (JointRankConfig.seed, default 0)
    device: str | None = None  # where the linear algebra runs; tensors are read and written on the CPU
    dtype: str | None = None  # output dtype of floating tensors (default: each tensor keeps the source's)
    workers: int = 1  # units factorised at once (local backend) or concurrent layer tasks (ray)
    backend: str = "local"  # local | ray
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def fingerprint(self) -> dict:
        """What determines the output bytes. BLAS rounding depends on the thread count, so the threads each unit
        runs on are part of it (a resumed run must split the cores the same way to write the same bytes)."""
        return {"solver": self.solver, "seed": self.seed, "device": self.device, "dtype": self.dtype,
                "unit_threads": self.unit_threads()}

    def solver_settings(self) -> Solver:
        return Solver(self.solver, self.seed, self.device)

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(getattr(torch, self.dtype)) if self.dtype and t.is_floating_point() else t

    def unit_threads(self) -> int:
        if self.backend == "ray":
            return RAY_TASK_CPUS
        return max(1, torch.get_num_threads() // max(1, self.workers))


@dataclass(frozen=True)
class LayerJob:
    """Everything one worker needs to produce one output shard: plain data, so it pickles to a Ray task."""

    source: str  # checkpoint directory (shared storage for Ray)
    layer: int
    prefix: str  # "model.layers.3."
    entries: tuple  # the plan's factorised PlanEntry starting at this layer (a cross-layer one reaches further)
    method: object  # the method's typed settings (jointrank.methods.settings_for)
    shard: str  # output shard file name
    staging: str  # where the shard is written
    # members of this layer that a cross-layer unit of an earlier layer's job replaces: not passed through here
    replaced_elsewhere: tuple = ()


def layer_tensor_names(source: TensorSource, prefix: str) -> list[str]:
    return sorted(n for n in source.shapes if n.startswith(prefix))


def factorise_unit(source: TensorSource, entry, method, options: StreamOptions):
    """Read one unit's weights, run it through the engine; returns (output tensors by name, UnitResult, seconds)."""
    names = [f"{m}.weight" for m in entry.members]
    bias_names = [f"{m}.bias" for m in entry.members if f"{m}.bias" in source.shapes]
    read = source.read(names + bias_names)
    weights = [read[n] for n in names]
    factors, result, seconds = run_unit(entry, weights, method, solver=options.solver_settings())
    biases = {m: options.cast(read[f"{m}.bias"]) for m in entry.members if f"{m}.bias" in read}  # kept exact
    dtype = getattr(torch, options.dtype) if options.dtype else weights[0].dtype  # as compress_: the weight's own
    return unit_tensors(entry, factors, biases, dtype=dtype), result, seconds


def passthrough(source: TensorSource, job: LayerJob, options: StreamOptions) -> dict[str, torch.Tensor]:
    """The layer's tensors that are not replaced by factors (norms, kept groups), unchanged but for --dtype."""
    members = [m for e in job.entries for m in e.members] + list(job.replaced_elsewhere)
    replaced = {f"{m}.{suffix}" for m in members for suffix in ("weight", "bias")}
    read = source.read([n for n in layer_tensor_names(source, job.prefix) if n not in replaced])
    return {k: options.cast(v) for k, v in read.items()}


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def run_layer_job(job: LayerJob, options: StreamOptions) -> dict:
    """Factorise one layer's units one after another and write its shard. Used by the Ray backend's tasks."""
    source = TensorSource.open(job.source)
    start = time.perf_counter()
    tensors, units = passthrough(source, job, options), []
    for entry in job.entries:
        out, result, seconds = factorise_unit(source, entry, job.method, options)
        tensors.update(out)
        units.append(unit_record(result, seconds))
    write_shard(tensors, Path(job.staging) / job.shard)
    return {"layer": job.layer, "units": units, "seconds": time.perf_counter() - start}


def unit_record(result: UnitResult, seconds: float) -> dict:
    return result.to_record(seconds)
