"""Where a checkpoint is written: refuse an output that would destroy the source or cannot be written, clean up
what dead runs left beside it, and give finished directories the permissions save_pretrained's would have.

Staging names carry the writer's PID (`.OUT.tmp-PID-xxxx` for an in-memory save, `.OUT.old-PID` for the previous
output during an --overwrite swap, and `progress.json`'s "pid" inside a streamed `.OUT.partial`), so the next run
can tell a dead run's leftovers (removed, said on stderr) from a live run's (refused: two runs must not write one
output).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import JointRankError


def check_output(out: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Refuse, before any work, an output that exists (unless overwrite), overlaps the source or is unwritable."""
    out = Path(out)
    if source is not None:
        check_not_source(out, source)
    if out.exists() and not overwrite:
        raise JointRankError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise JointRankError(f"{out} exists and is not a directory; choose another --out")
    check_writable(out)
    clean_stale(out)
    return out


def check_not_source(out: Path, source: str | Path) -> None:
    """--out equal to, inside or containing the model read from: writing it would destroy the source."""
    src = Path(source).expanduser().resolve()
    dst = out.expanduser().resolve()
    if dst == src or src.is_relative_to(dst):
        raise JointRankError(f"--out {out} {'is' if dst == src else 'contains'} the source model {source}; writing "
                             "there would destroy it: choose another --out")
    if dst.is_relative_to(src):
        raise JointRankError(f"--out {out} is inside the source model {source}; choose a directory outside it")


def check_writable(out: Path) -> None:
    """The output's parent can be created and written (tested with an empty probe directory, removed at once)."""
    ancestor = out.expanduser().absolute().parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise JointRankError(f"cannot write {out}: {ancestor} is a file, not a directory; choose another --out")
    try:
        Path(tempfile.mkdtemp(prefix=".jointrank-probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise JointRankError(f"cannot write {out}: {ancestor} is not writable ({exc.strerror or exc}); choose "
                             "another --out") from exc


def staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside `out`, named after this process so a later run can tell if it died."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def graveyard(out: Path) -> Path:
    return out.with_name(f".{out.name}.old-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs and is a Python (a recycled PID of something else does not count)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust kill()
    return b"python" in cmdline or b"jointrank" in cmdline


def _pid_of(name: str, marker: str) -> int | None:
    rest = name.split(marker, 1)[1]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def clean_stale(out: Path) -> None:
    """Remove what killed runs left beside `out`; refuse if a live run is writing the same output."""
    parent = out.parent
    if not parent.is_dir():
        return
    for leftover in sorted(parent.glob(f".{out.name}.tmp-*")):
        pid = _pid_of(leftover.name, ".tmp-")
        if pid is not None and pid_alive(pid):
            raise JointRankError(f"another jointrank run (pid {pid}) is writing {out} (its staging is {leftover}); "
                                 "wait for it, or stop it and rerun")
        if pid is None:  # written before staging names carried a PID: cannot tell whether it is alive
            _say(f"{leftover} was left by an earlier run; delete it if no jointrank run is writing {out}")
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        _say(f"removed {leftover}, left by a run that died (pid {pid})")
    for old in sorted(parent.glob(f".{out.name}.old-*")):
        pid = _pid_of(old.name, ".old-")
        if pid is not None and pid_alive(pid):
            raise JointRankError(f"another jointrank run (pid {pid}) is replacing {out}; wait for it, or stop it and "
                                 "rerun")
        if out.exists():  # the swap finished, only the removal of the replaced output was cut short
            shutil.rmtree(old, ignore_errors=True)
            _say(f"removed {old}, the replaced output of a run that died (pid {pid})")
        else:  # killed between the two renames: put the previous output back rather than lose it
            os.replace(old, out)
            _say(f"restored {out} from {old}: a run replacing it died (pid {pid}) before its new output was in place")


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename a complete staging directory to `out`; an existing `out` (--overwrite) is moved aside first and
    deleted only after the new one is in place, so no moment leaves neither."""
    finish_modes(staging)
    if out.exists():
        aside = graveyard(out)
        os.replace(out, aside)
        os.replace(staging, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, out)


def finish_modes(staging: Path) -> None:
    """tempfile.mkdtemp makes 0700 directories; a finished checkpoint gets what mkdir (save_pretrained) gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)


def _say(message: str) -> None:
    print(f"jointrank: {message}", file=sys.stderr)
