"""Tampered checkpoints: every load path refuses a checkpoint that is not what its config and manifest say.

transformers alone loads them with random weights and a warning; these tests fail if any such checkpoint loads.
"""

import json
import shutil

import pytest
from trust_cases import TAMPERS, make_checkpoint

import jointrank
from jointrank.cli import main
from jointrank.errors import JointRankError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "good")


def copy(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "ckpt")


def info(path, capsys, *flags):
    code = main(["info", str(path), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_pristine_checkpoint_verifies_and_loads(pristine, capsys):
    code, out, err = info(pristine, capsys, "--verify")
    assert code == 0 and "checksums: verified (45 tensors, sha256)" in out, (out, err)
    manifest = jointrank.read_manifest(pristine)
    assert len(manifest["checksums"]["tensors"]) == 45
    jointrank.load(pristine, verify_checksums=True)


def test_checkpoint_without_checksums_still_loads_and_says_so(pristine, tmp_path, capsys):
    old = copy(pristine, tmp_path)
    manifest = json.loads((old / "jointrank_manifest.json").read_text())
    del manifest["checksums"]  # as written before checksums were recorded
    (old / "jointrank_manifest.json").write_text(json.dumps(manifest))
    code, out, _ = info(old, capsys, "--verify")
    assert code == 0 and "checksums: none recorded" in out
    jointrank.load(old, verify_checksums=True)


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.name for t in TAMPERS])
def test_tampered_checkpoint_is_refused(pristine, tmp_path, capsys, tamper):
    from transformers import AutoModelForCausalLM

    path = copy(pristine, tmp_path)
    tamper.apply(path)
    code, out, err = info(path, capsys, "--verify")
    assert code == 1 and err.count("\n") == 1 and err.startswith("jointrank: error:"), (out, err)
    with pytest.raises(JointRankError):
        jointrank.load(path, verify_checksums=True)
    if not tamper.needs_checksums:
        with pytest.raises(JointRankError):
            jointrank.load(path)  # the structure check alone catches it
    if not tamper.no_quantizer:
        with pytest.raises(Exception):  # plain transformers, after `import jointrank`
            AutoModelForCausalLM.from_pretrained(path)
