"""Parallel streaming: the thread pool splits the CPU budget instead of oversubscribing it and writes the same
checkpoint as one worker; the Ray backend (one task per layer, shards through shared storage) too."""

import importlib.util
import threading

import pytest
import torch

from jointrank import load, merge_, stream
from jointrank.errors import JointRankError
from jointrank.planning import make_plan
from jointrank.stream import StreamOptions, compress_checkpoint

from test_stream import CONFIG, saved_tensors, tiny


def test_workers_split_the_thread_budget_and_write_the_same_checkpoint(tmp_path, monkeypatch):
    src = tiny("llama", tmp_path / "src")
    compress_checkpoint(src, tmp_path / "one", CONFIG, options=StreamOptions(progress=False))

    seen = []
    real = stream.factorise_unit

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr("jointrank.streaming.executors.factorise_unit", spy)
    budget = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compress_checkpoint(src, tmp_path / "two", CONFIG, options=StreamOptions(progress=False, workers=2))
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(budget)
    units = len(make_plan(stream.read_layout(stream.TensorSource.open(src)), CONFIG).factorised)
    assert len(seen) == units
    assert {name.split("_")[0] for name, _ in seen} == {"jointrank"}  # ran on the pool, not the caller's thread
    assert {threads for _, threads in seen} == {1}  # 2 workers x 1 thread = the budget of 2, not 2 x 2
    # BLAS results depend on the thread count in the last bits, so 2 workers x 1 thread is not bitwise 1 x 2
    # (which is why the thread count per unit is part of a resumable run's fingerprint); the weights are the same
    a, b = saved_tensors(tmp_path / "one"), saved_tensors(tmp_path / "two")
    assert sorted(a) == sorted(b)
    one, two = load(tmp_path / "one"), load(tmp_path / "two")
    merge_(one), merge_(two)
    sa, sb = one.state_dict(), two.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert torch.allclose(sa[name], sb[name], rtol=1e-4, atol=1e-6), name


def test_bad_worker_settings_are_refused(tmp_path):
    src = tiny("llama", tmp_path / "src")
    with pytest.raises(JointRankError, match="--workers"):
        compress_checkpoint(src, tmp_path / "o", CONFIG, options=StreamOptions(progress=False, workers=0))
    with pytest.raises(JointRankError, match="backend"):
        compress_checkpoint(src, tmp_path / "p", CONFIG, options=StreamOptions(progress=False, backend="dask"))


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray (pip install 'jointrank[dist]')")
def test_ray_backend_writes_the_same_checkpoint(tmp_path):
    import ray

    src = tiny("qwen2", tmp_path / "src", shards=True)
    compress_checkpoint(src, tmp_path / "local", CONFIG, options=StreamOptions(progress=False, solver="rsvd"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        compress_checkpoint(src, tmp_path / "ray", CONFIG,
                            options=StreamOptions(progress=False, solver="rsvd", backend="ray"))
    finally:
        ray.shutdown()
    local, remote = tmp_path / "local", tmp_path / "ray"
    shards = sorted(p.name for p in local.glob("*.safetensors"))
    assert shards == sorted(p.name for p in remote.glob("*.safetensors")) and len(shards) == 4
    for name in shards + ["config.json", "model.safetensors.index.json"]:
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
