"""The damage a checkpoint can suffer, as data: shared by tests/test_trust.py and research/bench/reliability.py.

Each tamper edits a saved checkpoint directory in place the way a bad copy, a hand edit or a buggy tool would.
Some edit config.json and the manifest consistently, so only the tensor check can catch them; others edit one
file, so the consistency check must. `needs_checksums` marks damage only the recorded checksums can reveal
(same names and shapes, different bytes): refused by `info --verify` and `load(verify_checksums=True)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

CONFIG = "config.json"
MANIFEST = "jointrank_manifest.json"


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def _units(cfg):
    return cfg["quantization_config"]["units"]


def _entries(manifest):
    return manifest["plan"]["entries"]


def _factorised(manifest):
    return [e for e in _entries(manifest) if e["structure"] != "keep"]


def _tensors(root: Path) -> tuple[Path, dict]:
    file = root / "model.safetensors"
    return file, load_file(str(file))


def _edit_tensors(root: Path, fn) -> None:
    file, tensors = _tensors(root)
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def missing_unit_config(root):  # a unit dropped from config.json only
    _edit_json(root / CONFIG, lambda c: _units(c).pop(0))


def missing_unit_everywhere(root):  # dropped from config and manifest alike: its factors are now unexplained
    removed = {}

    def cfg(c):
        removed["members"] = _units(c).pop(0)["members"]

    _edit_json(root / CONFIG, cfg)

    def man(m):
        for e in _entries(m):
            if e["members"] == removed["members"]:
                e["structure"], e["rank"] = "keep", None
        m["result"]["units"] = [u for u in m["result"]["units"] if u["members"] != removed["members"]]

    _edit_json(root / MANIFEST, man)


def extra_unit_everywhere(root):  # a unit the tensors do not have, listed consistently
    unit = {"group": "o", "members": ["model.layers.0.self_attn.o_proj"], "rank": 4, "shared": False}

    def cfg(c):
        _units(c).append(unit)

    def man(m):
        for e in _entries(m):
            if e["members"] == unit["members"]:
                e["structure"], e["rank"] = "separate", 4
        m["result"]["units"].append({"members": unit["members"], "rank": 4})

    _edit_json(root / CONFIG, cfg)
    _edit_json(root / MANIFEST, man)


def extra_unit_config(root):
    _edit_json(root / CONFIG, lambda c: _units(c).append(
        {"group": "o", "members": ["model.layers.0.self_attn.o_proj"], "rank": 4, "shared": False}))


def all_units_removed(root):
    _edit_json(root / CONFIG, lambda c: _units(c).clear())


def quantization_config_deleted(root):
    _edit_json(root / CONFIG, lambda c: c.pop("quantization_config"))


def factor_tensor_deleted(root):
    _edit_tensors(root, lambda t: t.pop(next(k for k in sorted(t) if k.endswith("q_proj.out.weight"))))


def basis_tensor_deleted(root):
    _edit_tensors(root, lambda t: t.pop(next(k for k in sorted(t) if k.endswith("_basis.weight")
                                             or k.endswith(".basis.weight"))))


def extra_tensor_added(root):
    _edit_tensors(root, lambda t: t.update({"model.layers.0.mlp.surprise.weight": torch.zeros(3, 3)}))


def dense_weight_restored(root):  # the original dense weight stored beside its factors
    def fn(t):
        name = next(k for k in sorted(t) if k.endswith("q_proj.out.weight"))
        t[name.replace(".out.weight", ".weight")] = torch.zeros(4, 4)

    _edit_tensors(root, fn)


def shared_flipped_config(root):
    def fn(c):
        unit = next(u for u in _units(c) if u["shared"])
        unit["shared"] = False

    _edit_json(root / CONFIG, fn)


def shared_flipped_everywhere(root):
    members = {}

    def cfg(c):
        unit = next(u for u in _units(c) if u["shared"])
        unit["shared"] = False
        members["m"] = unit["members"]

    def man(m):
        for e in _entries(m):
            if e["members"] == members["m"]:
                e["structure"] = "separate"

    _edit_json(root / CONFIG, cfg)
    _edit_json(root / MANIFEST, man)


def group_renamed_config(root):
    def fn(c):
        unit = next(u for u in _units(c) if u["shared"])
        unit["group"] = "kq"

    _edit_json(root / CONFIG, fn)


def group_renamed_everywhere(root):
    members = {}

    def cfg(c):
        unit = next(u for u in _units(c) if u["shared"])
        unit["group"] = "kq"
        members["m"] = unit["members"]

    def man(m):
        for e in _entries(m):
            if e["members"] == members["m"]:
                e["group"] = "kq"

    _edit_json(root / CONFIG, cfg)
    _edit_json(root / MANIFEST, man)


def manifest_rank_edited(root):
    def fn(m):
        e = _factorised(m)[0]
        e["rank"] += 1

    _edit_json(root / MANIFEST, fn)


def manifest_result_rank_edited(root):
    _edit_json(root / MANIFEST, lambda m: m["result"]["units"][0].update(rank=m["result"]["units"][0]["rank"] + 1))


def rank_edited_everywhere(root):  # config and manifest agree, the tensors have the old rank
    members = {}

    def cfg(c):
        _units(c)[0]["rank"] += 1
        members["m"] = _units(c)[0]["members"]

    def man(m):
        for e in _entries(m):
            if e["members"] == members["m"]:
                e["rank"] += 1
        for u in m["result"]["units"]:
            if u["members"] == members["m"]:
                u["rank"] += 1

    _edit_json(root / CONFIG, cfg)
    _edit_json(root / MANIFEST, man)


def unit_names_missing_module(root):
    def cfg(c):
        _units(c)[0]["members"] = ["model.layers.0.self_attn.nope_proj"]

    _edit_json(root / CONFIG, cfg)


def tensor_bytes_changed(root):  # one value of one factor: same names and shapes
    def fn(t):
        name = next(k for k in sorted(t) if k.endswith("out.weight"))
        t[name] = t[name].clone()
        t[name].view(-1)[0] += 1.0

    _edit_tensors(root, fn)


def checksum_record_edited(root):
    def fn(m):
        name = sorted(m["checksums"]["tensors"])[0]
        m["checksums"]["tensors"][name] = "0" * 64

    _edit_json(root / MANIFEST, fn)


def safetensors_truncated(root):
    file = root / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def safetensors_garbage(root):
    (root / "model.safetensors").write_bytes(b"\x00garbage" * 100)


def manifest_garbage(root):
    (root / MANIFEST).write_text("{not json")


def manifest_empty(root):
    (root / MANIFEST).write_text("")


def config_garbage(root):
    (root / CONFIG).write_text("garbage")


@dataclass(frozen=True)
class Tamper:
    name: str
    apply: Callable[[Path], None]
    needs_checksums: bool = False  # only the recorded checksums reveal it
    no_quantizer: bool = False  # plain from_pretrained never calls jointrank (nothing to hook into)


TAMPERS = [
    Tamper("missing unit (config.json only)", missing_unit_config),
    Tamper("missing unit (config.json and manifest)", missing_unit_everywhere),
    Tamper("extra unit (config.json only)", extra_unit_config),
    Tamper("extra unit (config.json and manifest)", extra_unit_everywhere),
    Tamper("all units removed", all_units_removed),
    Tamper("quantization_config deleted", quantization_config_deleted, no_quantizer=True),
    Tamper("factor tensor deleted", factor_tensor_deleted),
    Tamper("basis tensor deleted", basis_tensor_deleted),
    Tamper("extra tensor added", extra_tensor_added),
    Tamper("dense weight stored beside its factors", dense_weight_restored),
    Tamper("shared flipped (config.json only)", shared_flipped_config),
    Tamper("shared flipped (config.json and manifest)", shared_flipped_everywhere),
    Tamper("group renamed (config.json only)", group_renamed_config),
    Tamper("group renamed (config.json and manifest)", group_renamed_everywhere),
    Tamper("manifest plan rank edited", manifest_rank_edited),
    Tamper("manifest result rank edited", manifest_result_rank_edited),
    Tamper("rank edited in config.json and manifest", rank_edited_everywhere),
    Tamper("unit names a module that does not exist", unit_names_missing_module),
    Tamper("safetensors truncated", safetensors_truncated),
    Tamper("safetensors garbage", safetensors_garbage),
    Tamper("manifest garbage", manifest_garbage),
    Tamper("manifest empty", manifest_empty),
    Tamper("config.json garbage", config_garbage),
    Tamper("tensor bytes changed", tensor_bytes_changed, needs_checksums=True, no_quantizer=True),
    Tamper("checksum record edited", checksum_record_edited, needs_checksums=True, no_quantizer=True),
]


def make_checkpoint(root: Path, arch: str = "qwen2") -> Path:
    """A small compressed checkpoint with joint and separate units (tests/conftest.py's tiny models)."""
    import jointrank
    from conftest import tiny_model
    from jointrank.plan import GroupRule, JointRankConfig

    model = tiny_model(arch)
    config = JointRankConfig(rules={"qk": GroupRule("joint"), "down": GroupRule("separate")}, ratio=0.5)
    result = jointrank.compress_(model, config, progress=False)
    return jointrank.save(model, None, root, result, source=arch, config=config)
