"""One GPU per local worker (bench.device, bench.parallel, bench.sweep): checked on CPU through the environment each
worker gets."""
import multiprocessing as mp
import time

import pytest

from bench import device as devices
from bench import parallel, sweep
from bench.spec import RunSpec


def _specs(n, device="auto"):
    return [RunSpec(method="kl_free_lora", rank=4, seed=s, device=device) for s in range(n)]


def test_worker_gpus_one_each_then_round_robin():
    assert devices.worker_gpus(["0", "1"], 2) == ["0", "1"]
    assert devices.worker_gpus(["GPU-a", "GPU-b", "GPU-c"], 2) == ["GPU-a", "GPU-b"]
    assert devices.worker_gpus(["3", "5"], 5) == ["3", "5", "3", "5", "3"]
    assert devices.worker_gpus([], 4) == []


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6, 2")
    assert devices.visible_gpus() == ["6", "2"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert devices.visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.visible_gpus() == []


def test_jobs_auto_is_the_number_of_gpus_on_cuda_and_unchanged_on_cpu(monkeypatch):
    monkeypatch.setattr(devices, "visible_gpus", lambda: ["0", "1", "2"])
    monkeypatch.setattr(parallel, "small_model_on_cpu", lambda specs: False)
    monkeypatch.setattr(devices, "resolve_device", lambda d: "cuda" if d in ("auto", "cuda") else d)
    assert parallel.auto_jobs(_specs(5)) == 3
    assert parallel.auto_jobs(_specs(2)) == 2          # no more workers than runs
    assert parallel.auto_jobs(_specs(5, "cuda:1")) == 1  # runs naming their device are not spread
    assert devices.local_gpus(_specs(2, "cuda:1")) == []
    monkeypatch.setattr(devices, "resolve_device", lambda d: "cpu")  # a CPU machine: today's rule, GPUs or not
    assert devices.local_gpus(_specs(2)) == []
    assert parallel.auto_jobs(_specs(5)) == 1


def _slow_environment():
    time.sleep(1.0)  # long enough that both workers take a task
    return devices.worker_environment()


def test_each_spawned_worker_sees_only_its_own_gpu():
    """The sweep's own worker pool, spawned processes: worker i gets CUDA_VISIBLE_DEVICES = GPU i."""
    ctx = mp.get_context("spawn")
    with sweep.worker_pool(ctx, 2, 1, ctx.Queue(), gpus=["3", "5"]) as pool:
        seen = [f.result() for f in [pool.submit(_slow_environment) for _ in range(4)]]
    by_pid = {}
    for env in seen:
        by_pid.setdefault(env["pid"], set()).add(env["CUDA_VISIBLE_DEVICES"])
    assert len(by_pid) == 2 and sorted(v for values in by_pid.values() for v in values) == ["3", "5"]


def test_unpinned_workers_keep_the_parent_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    ctx = mp.get_context("spawn")
    with sweep.worker_pool(ctx, 1, 1, ctx.Queue(), gpus=[]) as pool:
        assert pool.submit(devices.worker_environment).result()["CUDA_VISIBLE_DEVICES"] == "7"


def test_a_cpu_run_records_no_gpu():
    assert devices.run_device("cpu") == {}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_run_records_its_device():
    record = devices.run_device("cuda")
    assert record["device_name"]
