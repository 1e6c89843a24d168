"""Which device a run uses, how its peak memory is measured there, and which GPU each local worker sees."""
from __future__ import annotations

import os
import threading

import psutil
import torch


def resolve_device(device: str) -> str:
    """`auto`: CUDA where torch sees a GPU, else CPU; any other value as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class PeakMemory:
    """Peak memory of one run: GPU max allocated on CUDA; on CPU the process's resident set, sampled every 20 ms
    (ru_maxrss would carry an earlier run's peak over to every later run of an in-process sweep)."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            process = psutil.Process()

            def sample():
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, process.memory_info().rss)
            self.peak = process.memory_info().rss
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


# ---- one GPU per local worker ----------------------------------------------------------------------------------
# One GPU per local worker: which CUDA device each worker process of a parallel sweep sees.
#
# A worker is pinned by setting CUDA_VISIBLE_DEVICES in the fresh (spawned) process before anything in it initializes
# CUDA (https://docs.nvidia.com/cuda/cuda-c-programming-guide/#env-vars); its runs then use `cuda` (= its one GPU).
# Worker i gets the i-th visible GPU; with more workers than GPUs they share them round-robin. Runs that name a device
# themselves (device cuda:N) are not pinned: they get the device they name.

VISIBLE = "CUDA_VISIBLE_DEVICES"


def synchronize(device: str | None = None) -> None:
    """Wait for the accelerator's queued kernels (timings read the clock after the work, not after its launch); a
    no-op on CPU, where every kernel has finished when its call returns."""
    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        torch.cuda.synchronize()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: that variable's own entries where it is set
    (indices, GPU-/MIG- UUIDs), else every device CUDA reports; [] without CUDA."""
    import torch
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get(VISIBLE)
    if listed is None:
        return [str(i) for i in range(count)]
    return [item.strip() for item in listed.split(",") if item.strip()][:count]


def local_gpus(specs) -> list[str]:
    """The GPUs a local parallel sweep of these runs spreads its workers over: the visible ones where every run's
    device is `auto` on a CUDA machine or `cuda`; [] otherwise (CPU runs, or runs naming a device cuda:N)."""
    if not specs or any(resolve_device(s.device) != "cuda" for s in specs):
        return []
    return visible_gpus()


def worker_gpus(gpus: list[str], jobs: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each of `jobs` workers: worker i -> GPU i, round-robin past len(gpus)."""
    return [gpus[i % len(gpus)] for i in range(jobs)] if gpus else []


def pin_worker(gpu_queue) -> str | None:
    """In a fresh worker process, before CUDA initializes: take this worker's GPU from the queue the parent filled
    (one entry per worker) and make it the only one the process sees."""
    if gpu_queue is None:
        return None
    gpu = gpu_queue.get(timeout=120)
    os.environ[VISIBLE] = gpu
    return gpu


def run_device(device: str) -> dict:
    """What a run records about its GPU (nothing on CPU): the CUDA_VISIBLE_DEVICES it ran under and the device's
    name."""
    if not device.startswith("cuda"):
        return {}
    import torch
    index = int(device.partition(":")[2] or 0)
    return {"cuda_visible_devices": os.environ.get(VISIBLE), "device_name": torch.cuda.get_device_name(index)}


def worker_environment() -> dict:
    """What a worker process sees (for tests and `bench` diagnostics): its pid and CUDA_VISIBLE_DEVICES."""
    return {"pid": os.getpid(), VISIBLE: os.environ.get(VISIBLE)}
