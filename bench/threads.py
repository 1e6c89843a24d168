"""torch's intra-op thread count for a block of work (CPU float sums depend on it)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


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
