"""Real crashes (SIGKILL of a `jointrank compress` subprocess at random moments; see tests/kill_trials.py):
nothing finished-looking is left, the next run recovers, and the result is byte-identical to an uninterrupted run.
A couple of trials run by default; many more behind the slow marker."""

import os
import random
import subprocess
import sys

import pytest
from kill_trials import KINDS, Trials

from jointrank.errors import JointRankError
from jointrank.outputs import check_output


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    return Trials(tmp_path_factory.mktemp("kill"))


@pytest.mark.parametrize("kind,seed", [("memory", 11), ("stream", 12)])
def test_kill_while_writing_then_recover(trials, kind, seed):
    outcome = trials.trial(kind, random.Random(seed), seed, while_writing=True)
    assert outcome["ok"], outcome


@pytest.mark.slow
@pytest.mark.parametrize("index", range(24))
def test_kill_at_a_random_moment(trials, index):
    outcome = trials.trial(KINDS[index % len(KINDS)], random.Random(1000 + index), index,
                           while_writing=index % 2 == 1)
    assert outcome["ok"], outcome


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_runs_leftovers_are_removed_or_restored(tmp_path, capsys):
    out = tmp_path / "out"
    pid = dead_pid()
    (tmp_path / f".out.tmp-{pid}-abc").mkdir()  # a kill during an in-memory save
    (tmp_path / f".out.old-{pid}").mkdir()  # a kill between the two renames of an --overwrite swap
    (tmp_path / f".out.old-{pid}" / "model.safetensors").write_text("previous output")
    check_output(out, overwrite=True)
    err = capsys.readouterr().err
    assert f"removed {tmp_path}/.out.tmp-{pid}-abc, left by a run that died (pid {pid})" in err
    assert (out / "model.safetensors").read_text() == "previous output"  # restored, not lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_runs_staging_is_refused(tmp_path):
    (tmp_path / f".out.tmp-{os.getpid()}-abc").mkdir()
    with pytest.raises(JointRankError, match=f"another jointrank run \\(pid {os.getpid()}\\)"):
        check_output(tmp_path / "out", overwrite=False)
    assert (tmp_path / f".out.tmp-{os.getpid()}-abc").is_dir()
