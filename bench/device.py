"""Which device a run uses, and how its peak memory is measured there."""
from __future__ import annotations

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
