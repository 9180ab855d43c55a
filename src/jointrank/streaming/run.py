"""Compress a safetensors checkpoint layer by layer, without ever building the model: bounded memory, resumable.

The layout comes from config.json and the tensors' shapes (header reads only), the plan from the same make_plan as
in-memory compression, and then each decoder layer is one job: read that layer's tensors (memory-mapped), factorise
its units, write one output shard. Resident memory is about one layer's working set, whatever the model size.

Output is what `compress_` + `checkpoint.save` produce for the same plan (same tensor names and values, same
`quantization_config`, a manifest), so `jointrank.load` and `AutoModelForCausalLM.from_pretrained` read it alike.
It is sharded one shard per layer plus one for everything else, with a `model.safetensors.index.json`.

Atomic and resumable: work happens in `.NAME.partial/` beside the output; every finished layer's shard is renamed
into place there and recorded in `progress.json`. A rerun with resume=True skips recorded layers (after checking
the settings and source are the same); the output directory appears, complete, only at the end. Each layer's
result depends only on its inputs and the seed, never on what ran before, so a resumed run writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import methods
from ..architectures import ModelLayout
from ..engine import UnitResult
from ..errors import JointRankError
from ..format import INDEX_NAME, MANIFEST_NAME, counts_as_parameter
from ..linalg import DEFAULT_SEED
from .layer import LayerJob, StreamOptions, write_shard
from .source import TensorSource, numel, read_layout

PROGRESS_NAME = "progress.json"
# Besides config.json and the weights, these files of the source travel with the checkpoint (tokenizer,
# generation config, chat template). Never code (.py): outputs must load without trust_remote_code.
COPY_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
NOT_COPIED = {"config.json", INDEX_NAME, MANIFEST_NAME}


@dataclass
class StreamResult:
    out: Path
    result: object  # compress.CompressionResult, as compress_ returns it
    layers_done_before: int  # layers found finished in the staging directory (resume)
    seconds: float


def compress_checkpoint(source_dir: str | Path, out: str | Path, config, *, options: StreamOptions | None = None,
                        source_label: str | None = None, stop_after_layers: int | None = None) -> StreamResult:
    """Stream-compress the safetensors checkpoint in `source_dir` into `out`, following `config`.

    `stop_after_layers` is for tests: raise after that many layers were finished in this call, as a crash would.
    """
    from ..checkpoint import check_output
    from ..plan import CompressionPlan, check_plan_fits
    from ..planning import make_plan

    options = options or StreamOptions()
    start = time.perf_counter()
    out = Path(out)
    check_output(out, options.overwrite, source=source_dir)
    source = TensorSource.open(source_dir)
    layout = read_layout(source)
    source.check_finite()  # before planning (spectra) and before the staging directory exists
    if isinstance(config, CompressionPlan):
        plan, config_obj = config, None
        method_spec = plan.config.get("method", "svd")
        if methods.parse(method_spec)[0].needs_calibration:
            raise JointRankError(f"the plan's method {method_spec!r} needs calibration data run through the model; "
                                 "it needs the in-memory path (drop --stream)")
        check_plan_fits(plan, layout)
    else:
        _check_streamable(config)
        # global allocation reads each unit's weights from the files, one unit at a time: the in-memory plan
        plan, config_obj = make_plan(layout, config, tensors=source), config
    # the method with every setting (typed; plain data, so it pickles to Ray tasks and reaches every unit)
    method = methods.settings_for(plan.config.get("method", "svd"), plan.config.get("method_params"))
    # unset solver settings are the plan's, as compress_ uses them (the config's, or a loaded plan's)
    if options.solver is None:
        options = replace(options, solver=plan.config.get("solver", "auto"))
    if options.seed is None:
        options = replace(options, seed=plan.config.get("seed") or DEFAULT_SEED)
    jobs_by_layer = _jobs(source, layout, plan, method)
    staging = out.parent / f".{out.name}.partial"
    fingerprint = _fingerprint(source, plan, method, options)
    from .executors import check_options

    check_options(options)  # backend, workers, Ray installed: before the staging directory exists
    progress = _open_staging(staging, fingerprint, options, _settings(source, plan, method, options))
    before = len(progress["layers"])
    todo = [job for layer, job in sorted(jobs_by_layer.items()) if str(layer) not in progress["layers"]
            or not (staging / job.shard).is_file()]
    for job in todo:
        progress["layers"].pop(str(job.layer), None)
    todo = [replace(j, staging=str(staging)) for j in todo]

    rest_shard = _shard_name(layout.num_layers, layout.num_layers + 1)
    if not progress.get("rest_done") or not (staging / rest_shard).is_file():
        rest = [n for n in source.shapes if not n.startswith(layout.layers_path + ".")]
        write_shard({k: options.cast(v) for k, v in source.read(rest).items()}, staging / rest_shard)
        progress["rest_done"] = True
        _write_json(staging / PROGRESS_NAME, progress)

    finished_here = 0

    def record(done: dict) -> None:
        nonlocal finished_here
        progress["layers"][str(done["layer"])] = {"units": done["units"], "seconds": done["seconds"]}
        _write_json(staging / PROGRESS_NAME, progress)  # after the shard's rename: a recorded layer is complete
        finished_here += 1
        if stop_after_layers is not None and finished_here >= stop_after_layers and len(progress["layers"]) < len(
                jobs_by_layer):
            raise _Interrupted(f"stopped after {finished_here} layers (test hook)")

    from .executors import run_jobs

    try:
        run_jobs(source, todo, options, method, record)
    except JointRankError:
        if not progress["layers"]:  # refused before any layer was finished: leave nothing that blocks a rerun
            shutil.rmtree(staging, ignore_errors=True)
        raise
    result = _assemble(staging, source, layout, plan, progress, jobs_by_layer, rest_shard, method,
                       time.perf_counter() - start, options)
    _finish(staging, out, source, plan, result, config_obj, source_label or str(source_dir), options)
    return StreamResult(out, result, before, time.perf_counter() - start)


class _Interrupted(RuntimeError):
    pass


def _check_streamable(config) -> None:
    from ..plan import validate

    validate(config)
    if config.allocation == "loss":
        raise JointRankError("--allocation loss runs calibration text through the model to measure the loss; it needs "
                             "the in-memory path (drop --stream)")
    method, _ = methods.parse(getattr(config, "method", "svd"))
    if method.needs_calibration:
        raise JointRankError(f"method {method.name!r} needs calibration data run through the model; it needs the "
                             "in-memory path (drop --stream)")


def _shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _jobs(source: TensorSource, layout: ModelLayout, plan, method) -> dict[int, LayerJob]:
    total = layout.num_layers + 1
    by_layer: dict[int, list] = {i: [] for i in range(layout.num_layers)}
    for e in plan.factorised:
        by_layer[e.layer].append(e)
    # a cross-layer unit is factorised by its first layer's job, which writes every member's factors (into that
    # layer's shard: the index maps every tensor to its file); later layers must not pass those members through
    group_of = layout.group_of()
    elsewhere: dict[int, list] = {i: [] for i in range(layout.num_layers)}
    for e in plan.factorised:
        for m in e.members:
            if group_of[m].layer != e.layer:
                elsewhere[group_of[m].layer].append(m)
    return {i: LayerJob(str(source.root), i, f"{layout.layers_path}.{i}.", tuple(entries), method,
                        _shard_name(i, total), "", tuple(elsewhere[i])) for i, entries in by_layer.items()}


def _fingerprint(source: TensorSource, plan, method, options: StreamOptions) -> str:
    from ..version import __version__

    blob = json.dumps({"plan": plan.to_dict(), "method": methods.settings_dict(method), "options": options.fingerprint(),
                       "source": source.fingerprint(), "jointrank": __version__, "torch": torch.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _settings(source: TensorSource, plan, method, options: StreamOptions) -> dict:
    """What the fingerprint is made of, readable: kept in progress.json so a refused resume can name the cause."""
    from ..version import __version__

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {"plan": digest(plan.to_dict()), "method": methods.settings_dict(method), **options.fingerprint(),
            "source files": digest(source.fingerprint()), "jointrank": __version__, "torch": torch.__version__}


def _why_different(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "a different source, plan or settings"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in changed:
        if k == "unit_threads":  # BLAS rounding depends on it: the bytes would differ from the first part's
            parts.append(f"BLAS threads per unit {old.get(k)} then, {new.get(k)} now (set OMP_NUM_THREADS and "
                         "--workers as in the first run)")
        elif k in ("plan", "source files"):
            parts.append(f"a different {k}")
        else:
            parts.append(f"{k} {old.get(k)!r} then, {new.get(k)!r} now")
    return "; ".join(parts) or "a different source, plan or settings"


def _open_staging(staging: Path, fingerprint: str, options: StreamOptions, settings: dict | None = None) -> dict:
    if staging.exists():
        if options.resume:
            try:
                progress = json.loads((staging / PROGRESS_NAME).read_text())
            except (OSError, ValueError):
                progress = None
            _refuse_if_live(staging, progress)
            if progress is not None and progress.get("fingerprint") != fingerprint:
                raise JointRankError(f"{staging} holds an interrupted run made with "
                                     f"{_why_different(progress.get('settings'), settings or {})}: its bytes would "
                                     "differ; rerun with the same ones to resume, or --overwrite to start over")
            if progress is not None:
                progress["pid"] = os.getpid()  # this run owns it now
                _write_json(staging / PROGRESS_NAME, progress)
                return progress
        elif not options.overwrite:
            raise JointRankError(f"{staging} holds an interrupted run: pass --resume to continue it (or "
                                 "--overwrite to start over)")
        else:
            _refuse_if_live(staging, _read_progress(staging))
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    progress = {"fingerprint": fingerprint, "settings": settings, "layers": {}, "rest_done": False,
                "pid": os.getpid()}
    _write_json(staging / PROGRESS_NAME, progress)
    return progress


def _read_progress(staging: Path) -> dict | None:
    try:
        return json.loads((staging / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return None


def _refuse_if_live(staging: Path, progress: dict | None) -> None:
    """Two runs must not share a staging directory: refuse if the one that wrote it is still running."""
    from ..outputs import pid_alive

    pid = (progress or {}).get("pid")
    if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
        raise JointRankError(f"{staging} is being written by another jointrank run (pid {pid}); wait for it, or "
                             "stop it and rerun with --resume")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _assemble(staging, source, layout, plan, progress, jobs_by_layer, rest_shard, method, seconds, options):
    """The CompressionResult of the whole run (from progress records) and the shard index."""
    from safetensors import safe_open

    from ..compress import CompressionResult

    units, unit_seconds, layer_seconds = [], [], []
    for layer in sorted(jobs_by_layer):
        rec = progress["layers"][str(layer)]
        layer_seconds.append(rec["seconds"])
        for u in rec["units"]:
            unit_seconds.append(u["seconds"])
            units.append(UnitResult.from_record(u))
    weight_map, total_size, params_total, params_decoder = {}, 0, 0, 0
    tied = source.config.get("tie_word_embeddings", False)
    for shard in [jobs_by_layer[i].shard for i in sorted(jobs_by_layer)] + [rest_shard]:
        with safe_open(str(staging / shard), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                weight_map[key] = shard
                n = numel(shape)
                total_size += n * _itemsize(f.get_slice(key).get_dtype())
                if not counts_as_parameter(key, tied):
                    continue
                params_total += n
                if key.startswith(layout.layers_path + "."):
                    params_decoder += n
    result = CompressionResult(plan=plan, units=units, params_total_before=layout.params_total,
                               params_total_after=params_total, params_decoder_before=layout.params_decoder,
                               params_decoder_after=params_decoder, seconds=seconds,
                               extra={"stream": {"solver": options.solver, "seed": options.seed,
                                                 "workers": options.workers, "backend": options.backend,
                                                 "layer_seconds": layer_seconds, "unit_seconds": unit_seconds,
                                                 "factorise_seconds": sum(unit_seconds)}})
    index = {"metadata": {"total_size": total_size},
             "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
    _write_json(staging / INDEX_NAME, index)
    return result


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)


def _finish(staging, out, source, plan, result, config_obj, source_label, options) -> None:
    """config.json with the quantization_config, copied tokenizer files, manifest last, then into place."""
    from ..checkpoint import manifest_for, stamped, with_checksums
    from ..format import quantization_units
    from ..hf_integration import JointRankQuantizationConfig
    from ..outputs import swap_into_place
    from ..plan import JointRankConfig

    if out.exists() and not options.overwrite:  # it did not exist when the run started (check_output)
        raise JointRankError(f"{out} appeared while this run was working and --overwrite was not given, so it was "
                             f"left alone; the finished layers are kept in {staging}: move {out} away and rerun "
                             "with --resume (or add --overwrite to replace it)")
    config = dict(source.config)
    config["quantization_config"] = JointRankQuantizationConfig(units=quantization_units(plan)).to_dict()
    if options.dtype:
        config["dtype"] = config["torch_dtype"] = options.dtype
    _write_json(staging / "config.json", config)
    for f in sorted(source.root.iterdir()):
        if f.is_file() and f.suffix in COPY_SUFFIXES and f.name not in NOT_COPIED and not f.name.startswith("."):
            shutil.copyfile(f, staging / f.name)
    cfg = config_obj if config_obj is not None else JointRankConfig.from_dict(plan.config)
    manifest = manifest_for(result, source=source_label, config=cfg)
    full = with_checksums(stamped(manifest), staging)
    (staging / PROGRESS_NAME).unlink(missing_ok=True)
    (staging / MANIFEST_NAME).write_text(json.dumps(full, indent=2) + "\n")
    swap_into_place(staging, out)
