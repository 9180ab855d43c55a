"""Check that a checkpoint is what its config.json and manifest say it is, before anyone computes with it.

transformers loads a checkpoint whose tensors disagree with its config: a missing tensor is initialised at random
and reported in a LOAD REPORT warning, an extra one is ignored. For a low-rank checkpoint that means a model that
runs and is silently wrong. So every jointrank load path (jointrank.load, from_pretrained through the quantizer,
`jointrank eval`/`info`) calls into this module first:

- structure: the tensors stored are exactly the state dict of the architecture in config.json with the low-rank
  units of its quantization_config installed, with the same shapes (so the ranks too); nothing missing, nothing
  extra. The expectation comes from building the model on the meta device (no memory, no weights), the same way
  transformers does, so it can never disagree with what transformers will load.
- consistency: the manifest's plan and results describe the same units (members, rank, joint or separate) as the
  config's quantization_config, and a factorised checkpoint has one at all.
- content (on request, `jointrank info --verify`): the sha256 of every tensor's stored bytes equals the one recorded
  in the manifest at save time. Checkpoints made before checksums existed have none; that is said, not an error.

Only safetensors headers are read here (plain JSON, never a pickle); hashing reads the data bytes themselves.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import JointRankError
from .format import BUFFER_SUFFIXES, INDEX_NAME, MANIFEST_NAME, SINGLE_NAME, structure_of

CHECKSUM_ALGORITHM = "sha256"

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets of the data in the file
    end: int


@dataclass
class Report:
    """What a verification established, for `jointrank info` to print."""

    tensors: int = 0
    units: int = 0
    checksums: str = "not checked"  # "verified (N tensors)" | "none recorded (...)" | "not checked"
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Reading what is stored


def read_header(file: str | Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its header; a truncated or corrupt file is one clear error."""
    file = Path(file)
    fix = "re-copy or regenerate it"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise JointRankError(f"{file} is not a safetensors file (only {size} bytes); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise JointRankError(f"{file} is not a valid safetensors file (header of {n} bytes in a file of "
                                     f"{size}): truncated or corrupt; {fix}")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise JointRankError(f"cannot read {file}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise JointRankError(f"{file} has a corrupt safetensors header ({exc}); {fix}") from exc
    if not isinstance(header, dict):
        raise JointRankError(f"{file} has a corrupt safetensors header; {fix}")
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise JointRankError(f"{file}: corrupt header entry for {name}; {fix}") from exc
        if not 0 <= start <= end or base + end > size:
            raise JointRankError(f"{file} is truncated: {name} ends at byte {base + end}, the file has {size}; {fix}")
        out[name] = StoredTensor(file, dtype, shape, base + start, base + end)
    return out


def stored_tensors(directory: str | Path, files: list[str | Path] | None = None) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors checkpoint directory (single file or sharded with an index), by name."""
    root = Path(directory)
    if files is None:
        files = _weight_files(root)
    out: dict[str, StoredTensor] = {}
    for file in files:
        for name, t in read_header(file).items():
            if name in out:
                raise JointRankError(f"{name} is stored twice ({out[name].file.name} and {Path(file).name})")
            out[name] = t
    return out


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JointRankError(f"{index} is not a valid shard index ({exc}); re-copy or regenerate it") from exc
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise JointRankError(f"{index} lists {missing[0]}, which is missing; re-copy the checkpoint")
        files = [root / n for n in names]
        # every tensor the index names must be in the shard it names (transformers trusts the index)
        headers = {n: set(read_header(root / n)) for n in names}
        for tensor, shard in weight_map.items():
            if tensor not in headers[shard]:
                raise JointRankError(f"{index} says {tensor} is in {shard}, which does not hold it; re-copy the "
                                     "checkpoint")
        return files
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    raise JointRankError(f"{root} has no {SINGLE_NAME} or {INDEX_NAME}")


# ---------------------------------------------------------------------------------------------------------------
# What should be stored


def expected_tensors(model) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(required name -> shape, optional names) of a model skeleton: its state dict, tied copies optional."""
    state = model.state_dict(keep_vars=True)
    optional = set(getattr(model, "all_tied_weights_keys", None) or {})
    seen: set[int] = set()
    for name, t in state.items():  # a tensor reachable under two names is stored under one of them
        if id(t) in seen:
            optional.add(name)
        seen.add(id(t))
    required = {n: tuple(t.shape) for n, t in state.items() if n not in optional}
    return required, optional


def skeleton(config_dict: dict, units: list[dict]):
    """The model config.json describes, on the meta device, with the low-rank units installed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modules import install_unit

    cfg = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise JointRankError(f"config.json does not describe a model transformers can build ({exc})") from exc
    install_units(model, units, install_unit)
    from .quantize import install_quantized

    q = config_dict.get("quantization_config")
    install_quantized(model, q.get("weights") if isinstance(q, dict) else None)
    return model


def install_units(model, units, install_unit) -> None:
    """Install quantization_config units into a skeleton; a unit naming something that is not there is an error."""
    for i, unit in enumerate(units):
        try:
            members, rank, shared, group = unit["members"], int(unit["rank"]), bool(unit["shared"]), unit["group"]
            if rank < 1 or not members or not isinstance(group, str) or not group.isidentifier():
                raise ValueError("bad rank, members or group")
            install_unit(model, members, rank, shared=shared, group=group)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise JointRankError(f"config.json's quantization_config unit {i} ({unit!r:.120}) does not fit this "
                                 f"model ({exc}); the checkpoint is damaged, regenerate it") from exc


def check_tensors(model, stored: dict[str, StoredTensor] | dict[str, tuple], where: str) -> int:
    """The stored tensors are exactly those `model` (a skeleton) has, with its shapes. Returns how many."""
    required, optional = expected_tensors(model)
    shapes = {n: (t.shape if isinstance(t, StoredTensor) else tuple(t)) for n, t in stored.items()}
    missing = sorted(set(required) - set(shapes))
    extra = sorted(n for n in set(shapes) - set(required) - optional if not n.endswith(BUFFER_SUFFIXES))
    wrong = sorted(n for n in set(required) & set(shapes) if tuple(shapes[n]) != required[n])
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) (e.g. {extra[0]})")
    if wrong:
        n = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {n} is {list(shapes[n])}, the config implies "
                        f"{list(required[n])})")
    if problems:
        raise JointRankError(f"{where} does not match its config.json: {'; '.join(problems)}. It would load with "
                             "random weights; the checkpoint is damaged or was edited, regenerate it")
    return len(shapes)


# ---------------------------------------------------------------------------------------------------------------
# Manifest against config


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise JointRankError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise JointRankError(f"{path} is not valid JSON ({exc}); {what}") from exc
    if not isinstance(data, dict):
        raise JointRankError(f"{path} is not a JSON object; {what}")
    return data


MANIFEST_KEYS = ("source", "config", "plan", "result")  # what `jointrank compress` writes (info needs them)


def read_manifest(directory: str | Path, required: tuple[str, ...] = ()) -> dict:
    path = Path(directory)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        raise JointRankError(f"{path} is not a jointrank checkpoint (no {MANIFEST_NAME})")
    manifest = read_json(file, "the jointrank manifest is damaged; regenerate the checkpoint")
    for key in required:
        if key not in manifest:
            raise JointRankError(f"{file} has no {key!r}: not a jointrank manifest, or a damaged one; regenerate "
                                 "the checkpoint")
    return manifest


def _unit_key(u: dict) -> tuple:
    return (u.get("group"), tuple(u.get("members") or ()), u.get("rank"), bool(u.get("shared")))


def config_units(config_dict: dict, manifest: dict, where: str) -> list[dict]:
    """The units to install, after checking config.json and the manifest describe the same checkpoint."""
    q = config_dict.get("quantization_config")
    dense = manifest.get("format_kind", "factorised") == "dense"
    fix = "the checkpoint is damaged or was edited; regenerate it"
    if "plan" not in manifest and "result" not in manifest:
        # saved through the Python API with a manifest of the caller's own: config.json alone says what to expect
        units = (q or {}).get("units", []) if isinstance(q, dict) and q.get("quant_method") == "jointrank" else []
        if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
            raise JointRankError(f"{where}: config.json's quantization_config has no list of units; {fix}")
        return units
    try:
        planned = [{"group": e["group"], "members": list(e["members"]), "rank": e["rank"],
                    "shared": structure_of(e) == "joint"} for e in manifest["plan"]["entries"]
                   if structure_of(e) != "keep"]
        results = {tuple(u["members"]): u["rank"] for u in manifest["result"]["units"]}
    except (KeyError, TypeError) as exc:
        raise JointRankError(f"{where}: the manifest's plan or results are malformed ({exc}); {fix}") from exc
    if dense:
        if q is not None and (q or {}).get("quant_method") == "jointrank":
            raise JointRankError(f"{where}: the manifest says dense export, config.json has low-rank units; {fix}")
        return []
    if not isinstance(q, dict) or q.get("quant_method") != "jointrank":
        raise JointRankError(f"{where}: config.json has no jointrank quantization_config, but the manifest lists "
                             f"{len(planned)} low-rank units: it would load with random weights; {fix}")
    units = q.get("units")
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise JointRankError(f"{where}: config.json's quantization_config has no list of units; {fix}")
    try:
        keys = set(map(_unit_key, units))
    except TypeError as exc:
        raise JointRankError(f"{where}: config.json's quantization_config units are malformed; {fix}") from exc
    wanted = set(map(_unit_key, planned))
    if keys != wanted or len(units) != len(planned):
        ours, theirs = sorted(keys - wanted, key=repr), sorted(wanted - keys, key=repr)
        raise JointRankError(f"{where}: config.json and the manifest disagree on the low-rank units: config.json has "
                             f"{_describe(ours)}, the manifest {_describe(theirs)}; {fix}")
    for u in planned:
        if results.get(tuple(u["members"])) != u["rank"]:
            raise JointRankError(f"{where}: the manifest's results give {'+'.join(u['members'])} rank "
                                 f"{results.get(tuple(u['members']))}, its plan {u['rank']}; {fix}")
    return units


def _describe(keys: list[tuple]) -> str:
    if not keys:
        return "nothing else"
    group, members, rank, shared = keys[0]
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{'joint' if shared else 'separate'} {group} {'+'.join(map(str, members))} rank {rank}{more}"


# ---------------------------------------------------------------------------------------------------------------
# Checksums


def tensor_checksums(directory: str | Path) -> dict:
    """sha256 of every stored tensor's bytes, for the manifest (what `info --verify` checks later)."""
    stored = stored_tensors(directory)
    return {"algorithm": CHECKSUM_ALGORITHM, "tensors": {n: _digest(stored[n]) for n in sorted(stored)}}


def _digest(t: StoredTensor) -> str:
    h = hashlib.sha256()
    with open(t.file, "rb") as f:
        f.seek(t.start)
        left = t.end - t.start
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                raise JointRankError(f"{t.file} is truncated; re-copy or regenerate it")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def check_checksums(stored: dict[str, StoredTensor], manifest: dict, where: str) -> str:
    record = manifest.get("checksums")
    if not record:
        return "none recorded (made before jointrank recorded checksums): only the structure was checked"
    if record.get("algorithm") != CHECKSUM_ALGORITHM or not isinstance(record.get("tensors"), dict):
        raise JointRankError(f"{where}: the manifest's checksums are malformed; regenerate the checkpoint")
    expected = record["tensors"]
    if set(expected) != set(stored):
        odd = sorted(set(expected) ^ set(stored))[0]
        raise JointRankError(f"{where}: the manifest's checksums list other tensors than are stored (e.g. {odd})")
    for name in sorted(stored):
        if _digest(stored[name]) != expected[name]:
            raise JointRankError(f"{where}: tensor {name} in {stored[name].file.name} does not match the checksum "
                                 "recorded at save time: the file was changed or corrupted; regenerate or re-copy it")
    return f"verified ({len(stored)} tensors, {CHECKSUM_ALGORITHM})"


# ---------------------------------------------------------------------------------------------------------------
# The entry points


def verify_checkpoint(directory: str | Path, *, checksums: bool = False) -> Report:
    """Everything above for a jointrank checkpoint directory; raises JointRankError on the first problem."""
    root = Path(directory)
    manifest = read_manifest(root)
    config = read_json(root / "config.json", "config.json is damaged; regenerate the checkpoint") if (
        root / "config.json").is_file() else None
    if config is None:
        raise JointRankError(f"{root} has no config.json; the checkpoint is incomplete, regenerate it")
    units = config_units(config, manifest, str(root))
    stored = stored_tensors(root)
    report = Report(tensors=check_tensors(skeleton(config, units), stored, str(root)), units=len(units))
    if checksums:
        report.checksums = check_checksums(stored, manifest, str(root))
    elif not manifest.get("checksums"):
        report.checksums = "none recorded (made before jointrank recorded checksums)"
    else:
        report.checksums = "recorded, not checked (pass --verify to check them)"
    return report


def verify_on_load(model, checkpoint_files, units) -> None:
    """Called by the quantizer inside from_pretrained once the units are installed on the meta skeleton."""
    files = [Path(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
    if not files:
        return  # not a local safetensors load (e.g. a state dict passed in): nothing to compare against
    root = files[0].parent
    where = str(root)
    if (root / MANIFEST_NAME).is_file():
        manifest = read_manifest(root)
        config_units({"quantization_config": {"quant_method": "jointrank", "units": units}}, manifest, where)
    check_tensors(model, stored_tensors(root, files), where)
