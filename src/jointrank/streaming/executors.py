"""Run a streaming compression's layer jobs: one after another, on a local thread pool, or as Ray tasks.

Local: `workers` units (independent groups) are factorised at once. The CPU budget (torch.get_num_threads(), which
follows OMP_NUM_THREADS) is split between them, each worker thread running BLAS/LAPACK on budget // workers
threads, so the cores are never oversubscribed. Two layers are kept in flight so workers stay busy across a layer
boundary; a layer's shard is written, and recorded, as soon as all its units are done, in layer order.

Ray: one task per layer. Each task opens the source checkpoint itself (shared storage: every node must see the
same path), factorises the layer and writes its shard into the staging directory (also shared); the driver only
records progress. Ray connects to the cluster named by RAY_ADDRESS, or starts a local instance.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import JointRankError
from .layer import (RAY_TASK_CPUS, LayerJob, StreamOptions, factorise_unit, passthrough, run_layer_job, unit_record,
                    write_shard)
from .source import TensorSource

BACKENDS = ("local", "ray")


def check_options(options: StreamOptions) -> None:
    """What can be refused before any work: an unknown backend, no workers, Ray not installed."""
    import importlib.util

    if options.backend not in BACKENDS:
        raise JointRankError(f"unknown backend {options.backend!r}; choose from {', '.join(BACKENDS)}")
    if options.workers < 1:
        raise JointRankError(f"--workers must be at least 1; got {options.workers}")
    if options.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise JointRankError("--backend ray needs Ray: pip install 'jointrank[dist]'")


def run_jobs(source: TensorSource, jobs: list[LayerJob], options: StreamOptions, method, record) -> None:
    """Process every job; call record(done) once per finished layer, after its shard is in place."""
    check_options(options)
    if not jobs:
        return
    if options.backend == "ray":
        _run_ray(jobs, options, record)
    elif options.workers == 1:
        for job in _progress(jobs, options):
            record(run_layer_job(job, options))
    else:
        _run_threads(source, jobs, options, method, record)


def _progress(jobs, options):
    from tqdm.auto import tqdm

    return tqdm(jobs, desc="layers", unit="layer", disable=not options.progress)


def _finish_layer(source, options, job: LayerJob, futures, started: float) -> dict:
    import time

    tensors, units = passthrough(source, job, options), []
    for future in futures:
        out, result, seconds = future.result()
        tensors.update(out)
        units.append(unit_record(result, seconds))
    write_shard(tensors, Path(job.staging) / job.shard)
    return {"layer": job.layer, "units": units, "seconds": time.perf_counter() - started}


def _run_threads(source, jobs, options, method, record) -> None:
    import time

    budget = torch.get_num_threads()
    per_worker = max(1, budget // options.workers)

    def init():
        torch.set_num_threads(per_worker)  # per thread for OpenMP; MKL's global value is the same for all

    pool = ThreadPoolExecutor(options.workers, thread_name_prefix="jointrank", initializer=init)
    try:
        in_flight: deque = deque()
        for job in _progress(jobs, options):
            futures = [pool.submit(factorise_unit, source, e, method, options) for e in job.entries]
            in_flight.append((job, futures, time.perf_counter()))
            if len(in_flight) >= 2:
                record(_finish_layer(source, options, *in_flight.popleft()))
        while in_flight:
            record(_finish_layer(source, options, *in_flight.popleft()))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(budget)


def _ray_layer_task(job: LayerJob, options: StreamOptions) -> dict:
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", RAY_TASK_CPUS))))
    return run_layer_job(job, options)


def _run_ray(jobs, options, record) -> None:
    try:
        import ray
    except ImportError as exc:
        raise JointRankError("--backend ray needs Ray: pip install 'jointrank[dist]'") from exc
    if not ray.is_initialized():
        # RAY_ADDRESS (e.g. ray://head:10001 or auto) joins a cluster; without it a local instance is started
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=RAY_TASK_CPUS, max_retries=2)(_ray_layer_task)
    limit = options.workers if options.workers > 1 else len(jobs)  # tasks in flight (memory on small clusters)
    waiting = list(jobs)
    running = []
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                running.append(task.remote(waiting.pop(0), options))
            done, running = ray.wait(running, num_returns=1)
            record(ray.get(done[0]))
    finally:
        for ref in running:
            ray.cancel(ref)
