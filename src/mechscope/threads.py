"""Thread-count control for many small tensor ops.

Why: hundreds of small matrix products, solves or index ops gain nothing from torch's thread pool and pay its
synchronisation; on a busy 2-core machine two threads made a small probe cross-validation 80x slower."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """Run the block on one torch thread when `active` (the previous count is restored afterwards)."""
    n = torch.get_num_threads()
    if not active or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


__all__ = ["one_thread"]
