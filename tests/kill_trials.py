"""Real crashes: `jointrank compress` in a subprocess, killed with SIGKILL at a random moment, then looked at.

Shared by tests/test_kill.py (a few trials in the default suite, many behind the slow marker) and
research/bench/reliability.py. A trial passes when, after the kill:
- nothing finished-looking is left: OUT either does not exist or is complete (verifies, checksums included, and
  holds the same tensors bytes as an uninterrupted run);
- the next run recovers: an in-memory rerun (or --overwrite rerun) succeeds, cleaning the dead run's staging; a
  streamed one is continued with --resume; either way the result is byte-identical to an uninterrupted run, and
  no staging leftovers remain beside OUT.
The kill moment is drawn uniformly between just before the run's first write and just after OUT appears (both
measured on a reference run), so kills land while it factorises, writes shards, saves and swaps into place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("memory", "stream", "overwrite")
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
MANIFEST = "jointrank_manifest.json"


def make_source(path: Path) -> Path:
    """A Llama big enough that writing it takes a noticeable moment (about 100 MB in float32, 6 layers)."""
    from tiny_models import tiny_model

    model = tiny_model("llama", vocab_size=2000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                       tie_word_embeddings=False)
    model.save_pretrained(path, max_shard_size="40MB")
    return path


def command(kind: str, source: Path, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "jointrank.cli", "compress", str(source), "--qk", "joint", "--gate-up", "joint",
            "--down", "separate", "--ratio", "0.5", "--out", str(out)]
    if kind == "stream":
        args.append("--stream")
    if kind == "overwrite":
        args.append("--overwrite")
    return args + list(extra)


def _env() -> dict:
    env = dict(os.environ)
    env.update(ENV)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(), capture_output=True, text=True)


def recover(args: list[str]) -> subprocess.CompletedProcess:
    """Run the recovery command in this process (saves an interpreter start per trial; the crash was real).

    On one BLAS thread like the killed run (ENV), so a resumed run is allowed to continue it and writes the
    same bytes."""
    import contextlib
    import io

    import torch

    from jointrank.cli import main

    threads = torch.get_num_threads()
    err = io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args[3:])  # without "python -m jointrank.cli"
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def leftovers(out: Path) -> list[str]:
    """Staging entries beside OUT (in-memory .tmp-, swap .old-, streamed .partial)."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def tensor_files(path: Path) -> dict[str, bytes]:
    """Every file of a checkpoint but the manifest (which holds timings), by name: what must be byte-identical."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != MANIFEST}


@dataclass
class Reference:
    files: dict[str, bytes]
    seconds: float  # the whole run
    first_write: float  # when something first appeared beside OUT
    done: float  # when OUT appeared (the rest is interpreter shutdown)


class Trials:
    """A source model, one uninterrupted reference run per kind, and the trials."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.source = make_source(root / "source")
        self.refs: dict[str, Reference] = {}

    def reference(self, kind: str) -> Reference:
        if kind in self.refs:
            return self.refs[kind]
        base = "stream" if kind == "stream" else "memory"
        if base in self.refs:  # an --overwrite run writes what an in-memory one does
            self.refs[kind] = self.refs[base]
            return self.refs[kind]
        out = self.root / f"ref-{base}" / "out"
        out.parent.mkdir()
        start = time.perf_counter()
        proc = subprocess.Popen(command(base, self.source, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        first = done = None
        while proc.poll() is None:
            if first is None and _staged(out.parent):
                first = time.perf_counter() - start
            if done is None and out.exists():
                done = time.perf_counter() - start
            time.sleep(0.005)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"reference run failed: {proc.stderr.read()}")
        first = first if first is not None else seconds * 0.8
        self.refs[kind] = Reference(tensor_files(out), seconds, first, done if done is not None else seconds)
        return self.refs[kind]

    def trial(self, kind: str, rng: random.Random, index: int, *, while_writing: bool = False) -> dict:
        """One kill. while_writing: at a random moment after the run's first write (when it has staged something),
        within the time writing took in the reference run; otherwise at a random time since its start."""
        ref = self.reference(kind)
        work = self.root / f"{kind}-{index}"
        work.mkdir()
        out = work / "out"
        if kind == "overwrite":  # a previous output that the run replaces
            out.mkdir()
            for name, data in ref.files.items():
                (out / name).write_bytes(data)
            shutil.copyfile(self._ref_dir("memory") / MANIFEST, out / MANIFEST)
        existing = _staged(work)
        start = time.perf_counter()
        proc = subprocess.Popen(command(kind, self.source, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if while_writing:  # wait for its first write (start-up time varies), then a random moment of the writing
            while proc.poll() is None and _staged(work) == existing:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 1.2 * (ref.done - ref.first_write)))
        else:
            time.sleep(rng.uniform(max(0.0, ref.first_write - 0.5), ref.done + 0.2))
        delay = time.perf_counter() - start
        finished_before_kill = proc.poll() is not None
        if not finished_before_kill:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        after_kill = {"out_exists": out.exists(), "leftovers": leftovers(out)}
        problems = []
        if out.exists():
            problems += _complete(out, ref, "after the kill")
        # recovery: the next run of the same command (with --resume if a streamed run left its staging)
        if out.exists() and kind != "overwrite":
            recovery = "none needed (finished before the kill)"
        else:
            extra = ["--resume"] if kind == "stream" and (work / ".out.partial").exists() else []
            rerun = recover(command(kind, self.source, out, *extra))
            recovery = "rerun" + (" --resume" if extra else "")
            if rerun.returncode != 0:
                problems.append(f"{recovery} failed: {rerun.stderr.strip().splitlines()[-1:]}")
            elif not out.exists():
                problems.append(f"{recovery} left no output")
            else:
                problems += _complete(out, ref, f"after {recovery}")
        if leftovers(out):
            problems.append(f"leftovers after recovery: {leftovers(out)}")
        outcome = {"kind": kind, "trial": index, "kill_at_s": round(delay, 2),
                   "writes_s": [round(ref.first_write, 2), round(ref.done, 2)], "killed": not finished_before_kill, **after_kill,
                   "recovery": recovery, "problems": problems, "ok": not problems}
        shutil.rmtree(work, ignore_errors=True)
        return outcome

    def _ref_dir(self, base: str) -> Path:
        return self.root / f"ref-{base}" / "out"


def _staged(work: Path) -> set:
    """What the run has put in its directory (the empty probe of check_writable, there for a moment, aside)."""
    return {p for p in work.iterdir() if not p.name.startswith(".jointrank-probe-")}


def _complete(out: Path, ref: Reference, when: str) -> list[str]:
    """OUT must be a whole checkpoint, byte-identical to the reference (manifest aside), and verify."""
    from jointrank.errors import JointRankError
    from jointrank.verify import verify_checkpoint

    problems = []
    try:
        verify_checkpoint(out, checksums=True)
    except JointRankError as exc:
        return [f"{when}: {out.name} looks finished but does not verify: {exc}"]
    files = tensor_files(out)
    if sorted(files) != sorted(ref.files):
        problems.append(f"{when}: files differ from an uninterrupted run: {sorted(set(files) ^ set(ref.files))}")
    else:
        differ = [n for n in files if files[n] != ref.files[n]]
        if differ:
            problems.append(f"{when}: not byte-identical to an uninterrupted run: {differ}")
    manifest = json.loads((out / MANIFEST).read_text())
    if "checksums" not in manifest:
        problems.append(f"{when}: manifest without checksums")
    return problems
