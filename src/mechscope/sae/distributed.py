"""Data-parallel sparse-coder training under `torchrun` (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node 8 -m mechscope.cli train-sae --store STORE --hook H --out DIR ...
    torchrun --nproc_per_node 2 my_script.py        # my_script calls mechscope.sae.train(...)

Why it is shaped this way: every rank holds the whole coder (SAEs are small next to the activations
that feed them) and a 1/world slice of each global batch, and the ranks' gradients are averaged after
backward, so the optimizer, decoder renormalisation and dead-latent counters stay identical on all
ranks. What makes N ranks train *exactly* like one process with the same global batch (not merely
"about the same", as per-rank losses would) is that every batch-level quantity of the loss is taken
over the global batch:

- the FVU denominator Σ‖y − ȳ‖² (reconstruction and AuxK): `batch_total_variance` all-reduces
  (n, Σy, Σ‖y‖²) in float64 and returns this rank's share of the global value, so the mean over
  ranks of the per-rank losses is the global loss and averaging gradients gives its gradient;
- BatchTopK's selection (the k·B largest activations of the global batch) and its inference
  threshold (the smallest kept activation): `batch_topk` gathers each rank's k·B largest candidates;
- firing counts for dead/dense tracking are summed over ranks;
- the logged loss, FVE and L0 are global.

Per-row penalties (L1, L0) are means over rows, so averaging them over equal shards is exact; the
global batch must therefore divide evenly by the world size. Every rank reads the same batch
sequence and keeps its slice (a store read is cheap next to the step; a model stream is run on
every rank: harvest a store first when the model forward dominates). Rank 0 alone writes
checkpoints and outputs; checkpoint folders must be on a filesystem every rank can read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mechscope.errors import InputError

__all__ = ["Group", "setup", "active", "activate", "batch_total_variance", "batch_topk", "all_sum",
           "all_min", "all_gather", "average_gradients", "shard", "launched_by_torchrun"]


@dataclass(frozen=True)
class Group:
    """The default process group as the trainer sees it."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ACTIVE: Group | None = None  # set by `activate` while a distributed train_many runs


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | str | None = None) -> Group | None:
    """The process group of this run, initialising it from torchrun's environment if needed, or None
    for a single process. CUDA ranks use cuda:LOCAL_RANK and NCCL; CPU ranks gloo."""
    if not (dist.is_available() and (dist.is_initialized() or launched_by_torchrun())):
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.get_world_size() == 1:
        return None
    return Group(dist.get_rank(), dist.get_world_size(), dev)


def active() -> Group | None:
    return _ACTIVE


@contextlib.contextmanager
def activate(group: Group | None) -> Iterator[None]:
    """Make the loss functions take batch-level quantities over `group` (None: this process only)."""
    global _ACTIVE
    old, _ACTIVE = _ACTIVE, group
    try:
        yield
    finally:
        _ACTIVE = old


def shard(batch_size: int, group: Group) -> slice:
    """This rank's rows of a global batch."""
    if batch_size % group.world:
        raise InputError(f"The global batch ({batch_size} rows) must divide evenly over {group.world} ranks "
                         "(per-row penalties are averaged over equal shards); change batch_size.")
    n = batch_size // group.world
    return slice(group.rank * n, (group.rank + 1) * n)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if _ACTIVE is None:
        return t
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks (a new tensor; `t` itself when single-process)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every rank along dim 0, in rank order (`t` when single-process)."""
    if _ACTIVE is None:
        return t
    parts = [torch.empty_like(t) for _ in range(_ACTIVE.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_min(t: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks (`t` itself when single-process)."""
    return _all_reduce(t, dist.ReduceOp.MIN)


def batch_total_variance(y: torch.Tensor) -> torch.Tensor:
    """Σ_b ‖y_b − ȳ‖² over the batch [B, d], clamped away from 0: the FVU denominator.

    Distributed: that of the GLOBAL batch times this rank's share of its rows (n_local / n_global),
    so the per-rank losses Σ_local ‖ŷ − y‖² / this average, over ranks, to the global FVU.
    """
    if _ACTIVE is None:
        c = y - y.mean(0)
        return torch.dot(c.reshape(-1), c.reshape(-1)).clamp_min(1e-12)
    yd = y.detach().double()
    stats = torch.cat([yd.new_tensor([y.shape[0]]), yd.sum(0), yd.square().sum().reshape(1)])
    n_local = float(y.shape[0])
    stats = all_sum(stats)
    n, s, q = stats[0], stats[1:-1], stats[-1]
    total = (q - torch.dot(s, s) / n) * (n_local / n)
    return total.to(y.dtype).clamp_min(1e-12)


def batch_topk(a: torch.Tensor, k_per_row: int) -> torch.Tensor:
    """BatchTopK over the global batch: keep this rank's entries of a [B, n] that are among the
    k_per_row · B_global largest of all ranks (dense result). Each rank offers its own k · B_global
    largest (a superset of its share of the global top), the ranks gather them and every rank keeps
    what reaches the global k·B-th value."""
    assert _ACTIVE is not None
    k_total = k_per_row * a.shape[0] * _ACTIVE.world
    flat = a.detach().flatten()
    cand = flat.topk(min(k_total, flat.numel()), sorted=False).values
    gathered = [torch.empty_like(cand) for _ in range(_ACTIVE.world)]
    dist.all_gather(gathered, cand)
    pool = torch.cat(gathered)
    kth = pool.topk(min(k_total, pool.numel()), sorted=False).values.min()
    return torch.where(a >= kth, a, torch.zeros_like(a))


@torch.no_grad()
def average_gradients(params: list[torch.Tensor]) -> None:
    """Average .grad over ranks in one flat all-reduce (what DistributedDataParallel does, without
    wrapping a module: the coder's loss is a function, not a forward)."""
    g = _ACTIVE
    if g is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([t.reshape(-1) for t in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= g.world
    offset = 0
    for t in grads:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
