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

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .architectures import ARCHITECTURES, Member, ModelLayout, group_layouts
from .engine import UnitResult, run_unit
from .errors import JointRankError
from .format import INDEX_NAME, MANIFEST_NAME, SINGLE_NAME, counts_as_parameter, unit_tensors
from .linalg import Solver

PROGRESS_NAME = "progress.json"
# Besides config.json and the weights, these files of the source travel with the checkpoint (tokenizer,
# generation config, chat template). Never code (.py): outputs must load without trust_remote_code.
COPY_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
NOT_COPIED = {"config.json", INDEX_NAME, MANIFEST_NAME}


@dataclass(frozen=True)
class StreamOptions:
    solver: str = "auto"
    seed: int = 0
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
        from .parallel import RAY_TASK_CPUS

        if self.backend == "ray":
            return RAY_TASK_CPUS
        return max(1, torch.get_num_threads() // max(1, self.workers))


# ---------------------------------------------------------------------------------------------------------------
# Reading: a checkpoint's tensor names, shapes and files, without loading a tensor


@dataclass
class TensorSource:
    """The tensors of a (sharded) safetensors checkpoint: name -> file, shape and dtype from the headers."""

    root: Path
    files: dict[str, str]  # tensor name -> file name
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    config: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "TensorSource":
        from .verify import read_json, stored_tensors

        root = Path(path)
        if not (root / "config.json").is_file():
            raise JointRankError(f"{root} has no config.json: streaming needs a Hugging Face safetensors directory")
        if not (root / INDEX_NAME).is_file() and not (root / SINGLE_NAME).is_file():
            raise JointRankError(f"{root} has no {SINGLE_NAME} or {INDEX_NAME}: streaming reads safetensors only")
        config = read_json(root / "config.json", "config.json is damaged; re-copy the model")
        stored = stored_tensors(root)  # headers only; truncated files, a missing shard, a bad index: one error
        files = {k: t.file.name for k, t in stored.items()}
        shapes = {k: t.shape for k, t in stored.items()}
        dtypes = {k: t.dtype for k, t in stored.items()}
        return cls(root, files, shapes, dtypes, config)

    def check_finite(self) -> None:
        """Refuse NaN/Inf anywhere in the source before any work (one tensor in memory at a time)."""
        from safetensors import safe_open

        from .finite import check_weights

        for file in sorted(set(self.files.values())):
            with safe_open(str(self.root / file), "pt") as f:
                check_weights(((k, f.get_tensor(k)) for k in f.keys()), where=str(self.root / file))

    def fingerprint(self) -> dict:
        return {name: [os.stat(self.root / name).st_size, os.stat(self.root / name).st_mtime_ns]
                for name in sorted(set(self.files.values()))}

    def names(self) -> list[str]:
        return list(self.shapes)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors. Files are mapped only while reading, so pages read for one layer are not
        still counted in this process's resident memory while the next one is processed."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.root / file), "pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k).clone()
        return out


def read_layout(source: TensorSource) -> ModelLayout:
    """The ModelLayout `describe(model)` would give, from config.json and tensor shapes alone."""
    config = source.config
    model_type = config.get("model_type")
    table = ARCHITECTURES.get(model_type)
    if table is None:
        raise JointRankError(f"unsupported architecture {model_type!r} for streaming; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    first_parent, first_member = next(iter(table.values()))[0], next(iter(table.values()))[1][0]
    pattern = re.compile(rf"^(.*)\.(\d+)\.{re.escape(first_parent)}\.{re.escape(first_member)}\.weight$")
    found = [pattern.match(n) for n in source.shapes]
    prefixes = {m.group(1) for m in found if m}
    if len(prefixes) != 1:
        raise JointRankError(f"cannot find the decoder layers of this {model_type} checkpoint "
                             f"(layer prefixes found: {sorted(prefixes) or 'none'})")
    layers_path = prefixes.pop()
    num_layers = 1 + max(int(m.group(2)) for m in found if m)
    expected = config.get("num_hidden_layers", num_layers)
    if expected != num_layers:
        raise JointRankError(f"config.json says {expected} layers, the checkpoint holds {num_layers}")
    def member(index: int, parent_name: str, name: str) -> Member | None:
        full = f"{layers_path}.{index}.{parent_name}.{name}"
        shape = source.shapes.get(f"{full}.weight")
        if shape is None or len(shape) != 2:
            return None
        return Member(full, shape[0], shape[1], f"{full}.bias" in source.shapes)

    groups = group_layouts(model_type, layers_path, num_layers, member)
    params = _parameter_names(source)
    decoder = [n for n in params if n.startswith(layers_path + ".")]
    return ModelLayout(model_type=model_type, num_layers=num_layers, groups=groups,
                       params_total=sum(_numel(source.shapes[n]) for n in params),
                       params_decoder=sum(_numel(source.shapes[n]) for n in decoder), layers_path=layers_path)


def _parameter_names(source: TensorSource) -> list[str]:
    """Stored tensors that are parameters, each counted once (a tied lm_head stored anyway is the embedding)."""
    tied = source.config.get("tie_word_embeddings", False)
    return [n for n in source.shapes if counts_as_parameter(n, tied)]


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


# ---------------------------------------------------------------------------------------------------------------
# One layer: read, factorise, return the output tensors


@dataclass(frozen=True)
class LayerJob:
    """Everything one worker needs to produce one output shard: plain data, so it pickles to a Ray task."""

    source: str  # checkpoint directory (shared storage for Ray)
    layer: int
    prefix: str  # "model.layers.3."
    entries: tuple  # the plan's factorised PlanEntry of this layer
    method: str
    shard: str  # output shard file name
    staging: str  # where the shard is written


def layer_tensor_names(source: TensorSource, prefix: str) -> list[str]:
    return sorted(n for n in source.shapes if n.startswith(prefix))


def factorise_unit(source: TensorSource, entry, method: str, options: StreamOptions):
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
    replaced = {f"{m}.{suffix}" for e in job.entries for m in e.members for suffix in ("weight", "bias")}
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


# ---------------------------------------------------------------------------------------------------------------
# The whole run: plan, staging directory, progress, final assembly


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
    from .checkpoint import check_output
    from .plan import CompressionPlan
    from .planning import make_plan

    options = options or StreamOptions()
    start = time.perf_counter()
    out = Path(out)
    check_output(out, options.overwrite, source=source_dir)
    source = TensorSource.open(source_dir)
    layout = read_layout(source)
    source.check_finite()  # before planning (spectra) and before the staging directory exists
    if isinstance(config, CompressionPlan):
        plan, config_obj = config, None
    else:
        _check_streamable(config)
        # global allocation reads each unit's weights from the files, one unit at a time: the in-memory plan
        plan, config_obj = make_plan(layout, config, tensors=source), config
    method = plan.config.get("method", "svd")
    jobs_by_layer = _jobs(source, layout, plan, method)
    staging = out.parent / f".{out.name}.partial"
    fingerprint = _fingerprint(source, plan, method, options)
    from .parallel import check_options

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

    from .parallel import run_jobs

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
    from . import methods
    from .plan import validate

    validate(config)
    method, _ = methods.parse(getattr(config, "method", "svd"))
    if method.needs_calibration:
        raise JointRankError(f"method {method.name!r} needs calibration data run through the model; it needs the "
                             "in-memory path (drop --stream)")


def _shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _jobs(source: TensorSource, layout: ModelLayout, plan, method: str) -> dict[int, LayerJob]:
    total = layout.num_layers + 1
    by_layer: dict[int, list] = {i: [] for i in range(layout.num_layers)}
    for e in plan.factorised:
        by_layer[e.layer].append(e)
    return {i: LayerJob(str(source.root), i, f"{layout.layers_path}.{i}.", tuple(entries), method,
                        _shard_name(i, total), "") for i, entries in by_layer.items()}


def _fingerprint(source: TensorSource, plan, method: str, options: StreamOptions) -> str:
    from .version import __version__

    blob = json.dumps({"plan": plan.to_dict(), "method": method, "options": options.fingerprint(),
                       "source": source.fingerprint(), "jointrank": __version__, "torch": torch.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _settings(source: TensorSource, plan, method: str, options: StreamOptions) -> dict:
    """What the fingerprint is made of, readable: kept in progress.json so a refused resume can name the cause."""
    from .version import __version__

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {"plan": digest(plan.to_dict()), "method": method, **options.fingerprint(),
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
    from .outputs import pid_alive

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

    from .compress import CompressionResult

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
                n = _numel(shape)
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
    from .checkpoint import manifest_for, stamped, with_checksums
    from .format import quantization_units
    from .hf_integration import JointRankQuantizationConfig
    from .outputs import swap_into_place
    from .plan import JointRankConfig

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


def is_streamable_source(path: str | Path) -> bool:
    """A local Hugging Face directory holding safetensors weights (what streaming can read)."""
    root = Path(path)
    with contextlib.suppress(OSError):
        return (root / "config.json").is_file() and ((root / INDEX_NAME).is_file() or (root / SINGLE_NAME).is_file())
    return False


# ---------------------------------------------------------------------------------------------------------------
# `jointrank compress --stream`


def wants_stream(args) -> bool:
    """Streaming is opt-in (--stream); --resume, --workers N>1, --backend ray and --seed only exist there."""
    return bool(getattr(args, "stream", False) or getattr(args, "resume", False)
                or (getattr(args, "workers", 1) or 1) > 1 or getattr(args, "backend", "local") != "local"
                or getattr(args, "seed", None) is not None)


def run_cli(args, config) -> int:
    """The streaming branch of `jointrank compress`: checks, runs, prints what the in-memory branch prints."""
    from .sources import resolve
    from .tables import params_summary

    refused = [flag for flag, on in (("--eval", args.eval), ("--dense", args.dense),
                                     ("--calibration", getattr(args, "calibration", None)),
                                     ("--heal", getattr(args, "heal", "none") not in (None, "none"))) if on]
    if refused:
        raise JointRankError(f"{' and '.join(refused)} need the whole model in memory: drop --stream, --resume, "
                             "--workers, --backend and --seed")
    source = resolve(args.model)
    if source.kind != "hf_dir" or not is_streamable_source(source.path):
        raise JointRankError(f"streaming reads a local Hugging Face directory with safetensors weights; {args.model} "
                             f"is a {source.kind.replace('_', ' ')}")
    options = StreamOptions(solver=config.solver, seed=0 if args.seed is None else args.seed, device=args.device,
                            dtype=args.dtype, workers=args.workers or 1, backend=args.backend, resume=args.resume,
                            overwrite=args.overwrite)
    try:
        done = compress_checkpoint(source.path, args.out, config, options=options, source_label=args.model)
    except KeyboardInterrupt:
        print(f"jointrank: finished layers are kept in {Path(args.out).parent / ('.' + Path(args.out).name)}"
              ".partial; rerun with --resume to continue", file=sys.stderr)
        raise
    r = done.result
    print(params_summary(r.params_total_before, r.params_total_after, r.params_decoder_before,
                         r.params_decoder_after))
    resumed = f" ({done.layers_done_before} layers resumed)" if done.layers_done_before else ""
    print(f"\nstreamed {r.plan.num_layers} layers{resumed}: factorise {r.extra['stream']['factorise_seconds']:.1f} s, "
          f"total {done.seconds:.1f} s; saved checkpoint to {args.out}")
    return 0
