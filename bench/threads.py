"""torch's intra-op thread count for a block of work (CPU float sums depend on it)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from bench.errors import BenchError


@contextmanager
def torch_threads(n: int | None):
    """The block runs with n threads (None: unchanged); the caller gets its own count back, also on error."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def env_threads(name: str) -> int | None:
    """A thread count from the environment (BENCH_NUM_THREADS, BENCH_FORWARD_THREADS): None where unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise BenchError(f"bad {name} {value!r}: must be a positive integer")
    return int(value)
