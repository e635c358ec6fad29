"""The one training plumbing: seeded per-step randomness, LR schedules, checkpoints, the loop.

Used by the zoo recipes, the SAE trainer and the tuned lens. Why one rule makes runs both
reproducible and resumable: everything random at step s is drawn from a generator seeded by
(seed, s, stream), so the data of a step does not depend on what ran before it, and the learning
rate is a pure function of s. A checkpoint then only needs the tensors of the run (weights,
optimizer moments, counters, the torch RNG where it is used), the step and the JSON log; a resumed
run replays exactly the steps an uninterrupted one would, to the same final bits.

A checkpoint records the run's identity (config, model identity, data identity) and refuses to
resume another run (`CheckpointMismatchError`, naming what differs), so settings never silently mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from mechscope.errors import CheckpointMismatchError, CorruptFileError, InputError
from mechscope.faults import kill_point
from mechscope.fileio import atomic_write_bytes, atomic_write_json, remove_temp_files

CHECKPOINT_DIR = ".checkpoint"  # the zoo and the tuned lens keep their checkpoint in out/.checkpoint
CHECKPOINT_VERSION = 2
STATE_FILE = "state.json"
DECAYS = ("constant", "linear", "cosine")
_RNG_KEY = "rng/torch"
_RESERVED = {"format_version", "identity", "step", "tensors", "log"}


# ------------------------------------------------------------------------------ seeded randomness


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): the data of step `step`.

    Stream names are namespaced by their user ("zoo:data", "sae:epoch", ...); the names in use
    reproduce the seeds of the per-package generators this one replaced, so trained results keep
    their exact random numbers.
    """
    digest = hashlib.sha256(f"mechscope.{stream}:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class EpochOrder:
    """Rows of n examples served in epochs, each a permutation seeded by (seed, epoch, stream).

    drop_last=True: each epoch serves n // batch_size whole batches (the leftover rows wait for the
    next epoch's shuffle); False: one endless stream of indices, so a batch may span two epochs.
    The permutation of the current epoch is cached: serving step s costs O(batch_size).
    """

    def __init__(self, n: int, batch_size: int, seed: int, stream: str, *, drop_last: bool) -> None:
        if n < 1 or batch_size < 1:
            raise InputError(f"Need at least one row and batch_size >= 1 (got {n} rows, batch_size {batch_size}).")
        if drop_last and n < batch_size:
            raise InputError(f"batch_size {batch_size} is larger than the {n} rows given; lower batch_size.")
        self.n, self.batch_size, self.seed, self.stream, self.drop_last = n, batch_size, seed, stream, drop_last
        self._cached: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """[n] int64: the row order of `epoch`."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, torch.randperm(self.n, generator=step_generator(self.seed, epoch, self.stream)))
        return self._cached[1]

    def rows(self, step: int) -> torch.Tensor:
        """[batch_size] int64: the row indices of `step`."""
        B = self.batch_size
        if self.drop_last:
            epoch, i = divmod(step, self.n // B)
            return self.permutation(epoch)[i * B:(i + 1) * B]
        idx = torch.arange(step * B, (step + 1) * B)
        epochs, within = idx // self.n, idx % self.n
        out = torch.empty_like(idx)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self.permutation(e)[within[sel]]
        return out


# ------------------------------------------------------------------------------ schedules


def scheduled_lr(step: int, lr: float, *, warmup: int = 0, decay: str = "constant", steps: int = 0,
                 decay_steps: int = 0) -> float:
    """The learning rate at `step` (0-based): a pure function of the step, so resuming needs no state.

    Linear warm-up from lr / warmup to lr over the first `warmup` steps, constant, then (decay
    "linear" or "cosine") down to 0 over the last `decay_steps` of `steps`. The same family gives a
    sparsity-coefficient warm-up (lr=1, decay "constant").
    """
    if decay not in DECAYS:
        raise InputError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}.")
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    decay_steps = decay_steps if decay != "constant" else 0
    start = steps - decay_steps
    if decay_steps <= 0 or step < start:
        return lr * warm
    t = (step - start) / decay_steps  # 0 -> 1 over the decay window
    factor = 1 - t if decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return lr * warm * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------ checkpoints


def config_dict(config: Any) -> dict[str, Any]:
    """JSON-able dict of a config dataclass (tuples become lists, as they would on disk)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


@dataclass
class Progress:
    """Where a run stands: the next step to run and its JSON log (metrics, milestones)."""

    step: int = 0
    log: Any = field(default_factory=dict)


class Saved(NamedTuple):
    """What a checkpoint holds: the step, the tensors (CPU), the JSON log and the caller's extra JSON."""

    step: int
    tensors: dict[str, torch.Tensor]
    log: Any
    extra: dict[str, Any]


class Checkpoint:
    """`folder/state.json` + `folder/step-XXXXXXXX.safetensors`, identity-checked.

    identity: JSON describing what makes the run (its config, the model's identity, the data's
    identity); `load` refuses a folder recorded with another identity. The tensor file is written
    first and state.json (which names it) last, each atomically, so a crash at any moment leaves a
    state.json that points at a complete tensor file. safetensors + JSON only: nothing is pickled.
    writer=False (the other ranks of a torchrun job) skips the writes; barrier, if given, runs
    after each save on every rank.
    """

    def __init__(self, folder: str | Path, identity: dict[str, Any], *, writer: bool = True,
                 barrier: Callable[[], None] | None = None) -> None:
        self.dir = Path(folder)
        self.identity = json.loads(json.dumps(identity))  # as it will read back
        self.writer, self.barrier = writer, barrier

    def exists(self) -> bool:
        return (self.dir / STATE_FILE).exists()

    def save(self, step: int, tensors: dict[str, torch.Tensor], *, log: Any = None,
             extra: dict[str, Any] | None = None, rng: bool = False) -> None:
        """Write the state after `step` steps; rng=True also keeps the torch CPU RNG state (restored by load)."""
        extra = extra or {}
        if set(extra) & _RESERVED:
            raise InputError(f"Checkpoint extra keys {sorted(set(extra) & _RESERVED)} are reserved.")
        if self.writer:
            from safetensors.torch import save

            self.dir.mkdir(parents=True, exist_ok=True)
            remove_temp_files(self.dir)  # left by a run killed while saving: never kept for good
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            if rng:
                tensors[_RNG_KEY] = torch.get_rng_state()
            name = f"step-{step:08d}.safetensors"
            atomic_write_bytes(self.dir / name, save(tensors, metadata={"format": "pt"}))
            atomic_write_json(self.dir / STATE_FILE, {**extra, "format_version": CHECKPOINT_VERSION,
                                                      "identity": self.identity, "step": step, "tensors": name,
                                                      "log": log})
            for old in self.dir.glob("step-*.safetensors"):
                if old.name != name:
                    old.unlink(missing_ok=True)
        if self.barrier is not None:
            self.barrier()

    def _read(self, tensors: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = json.loads((self.dir / STATE_FILE).read_text())
            if state.get("format_version") != CHECKPOINT_VERSION:
                raise ValueError(f"format_version {state.get('format_version')}, this mechscope reads "
                                 f"{CHECKPOINT_VERSION}")
            return state, load_file(self.dir / state["tensors"]) if tensors else {}
        except (ValueError, KeyError, OSError, SafetensorError) as e:
            raise CorruptFileError(f"Unreadable checkpoint in {self.dir} ({e}); delete that folder to start "
                                   "over.") from e

    def load(self) -> Saved | None:
        """The saved state, None when there is no checkpoint. Its torch RNG state (if saved) is restored
        by `restore_rng(saved)`, which train_loop calls: after the caller has built what it resumes.

        Raises CheckpointMismatchError when the folder holds a run with another identity."""
        if not self.exists():
            return None
        state, tensors = self._read()
        diff = identity_diff(state.get("identity"), self.identity)
        if diff:
            raise CheckpointMismatchError(
                f"{self.dir} holds a run (at step {state.get('step')}) with other settings: {'; '.join(diff)}. "
                "Resume it with the same settings, or delete that folder (or choose another one) to start over.")
        extra = {k: v for k, v in state.items() if k not in _RESERVED}
        return Saved(int(state["step"]), tensors, state.get("log"), extra)

    def saved_state(self) -> dict[str, Any] | None:
        """The JSON of the saved state (identity, step, log, the caller's extra), None without a checkpoint.
        No identity check: for callers that explain a mismatch themselves."""
        return self._read(tensors=False)[0] if self.exists() else None

    def step(self) -> int | None:
        """The step of the saved state, None without a checkpoint (no identity check)."""
        return int(self._read(tensors=False)[0]["step"]) if self.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def restore_rng(saved: Saved) -> None:
    """Set the torch CPU RNG to the state a checkpoint saved with rng=True (no-op otherwise)."""
    if _RNG_KEY in saved.tensors:
        torch.set_rng_state(saved.tensors[_RNG_KEY])


def identity_diff(saved: Any, wanted: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON identities: ["config.lr: saved 0.001, now 0.01", ...]."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(wanted)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in saved or k not in wanted:
                out.append(f"{sub}: {'saved ' + _short(saved[k]) if k in saved else 'not saved'}, "
                           f"{'now ' + _short(wanted[k]) if k in wanted else 'not given now'}")
            else:
                out += identity_diff(saved[k], wanted[k], sub)
        return out
    if isinstance(saved, list) and isinstance(wanted, list) and len(saved) == len(wanted):
        return [d for i, (a, b) in enumerate(zip(saved, wanted, strict=True))
                for d in identity_diff(a, b, f"{path}[{i}]")]
    return [] if saved == wanted else [f"{path or 'identity'}: saved {_short(saved)}, now {_short(wanted)}"]


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[:n - 3] + "..."


# ------------------------------------------------------------------------------ tensors of a run


def module_tensors(module: nn.Module, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """The module's state_dict under `prefix` (no copies: Checkpoint.save serialises them at once)."""
    return {f"{prefix}{k}": v.detach() for k, v in module.state_dict().items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim/") -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state (Adam moments, step counts, momentum buffers) as tensors.

    Param groups (lr, betas, ...) are not saved: they come from the run's config, which the
    checkpoint's identity checks."""
    out = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if value is not None:  # SGD without momentum keeps momentum_buffer None
                out[f"{prefix}{idx}/{key}"] = torch.as_tensor(value).detach()
    return out


def load_module_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "model/") -> None:
    module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
                           strict=True)


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           prefix: str = "optim/") -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            idx, key = k.removeprefix(prefix).split("/", 1)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


class Resumable(Protocol):
    """What train_loop checkpoints: the run's tensors and JSON state besides the log."""

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def restore(self, saved: Saved) -> None: ...


class ModuleAndOptimizer:
    """The usual Resumable: one module and its optimizer (tensors model/... and optim/...)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return module_tensors(self.module) | optimizer_tensors(self.optimizer), {}

    def restore(self, saved: Saved) -> None:
        load_module_tensors(self.module, saved.tensors)
        load_optimizer_tensors(self.optimizer, saved.tensors)


# ------------------------------------------------------------------------------ the loop


def train_loop(
    run: Resumable,
    *,
    checkpoint: Checkpoint | None,
    steps: int,
    step_fn: Callable[[int, Any], float | None],
    every: int,
    every_seconds: float | None = None,
    start: Progress | None = None,
    after_step: Callable[[int, Any], bool] | None = None,
    save_final: bool = False,
    rng: bool = False,
    progress: bool = True,
    postfix: Callable[[Any], dict[str, str] | None] | None = None,
    stop_after: int | None = None,
    desc: str = "train",
) -> tuple[Progress, bool]:
    """Run step_fn(step, log) for the remaining steps, resuming from the checkpoint if there is one.

    step_fn does one optimizer step and returns the loss (or None). after_step(steps_done, log)
    may record metrics in the JSON log and return True to stop early. A checkpoint is written every
    `every` steps, every `every_seconds` of wall time if given, after the last step if save_final
    (a rerun then returns at once), and at stop_after=K, which simulates an interrupt: checkpoint
    after K steps and return. start: the progress of a run the caller restored itself (then the
    checkpoint is not read again). rng: keep the torch CPU RNG state in checkpoints. Returns
    (progress, finished).
    """
    from tqdm.auto import tqdm

    if every < 1:
        raise InputError(f"The checkpoint interval must be a positive number of steps, got {every}.")
    if start is None:
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            run.restore(saved)
            restore_rng(saved)
        start = Progress(saved.step, saved.log) if saved is not None else Progress()
    state = start

    def save() -> None:
        nonlocal last_save
        if checkpoint is not None:
            tensors, extra = run.checkpoint_state()
            checkpoint.save(state.step, tensors, log=state.log, extra=extra, rng=rng)
        last_save = time.monotonic()

    last_save = time.monotonic()
    bar = tqdm(total=steps, initial=state.step, disable=not progress, desc=desc, dynamic_ncols=True)
    try:
        while state.step < steps:
            loss = step_fn(state.step, state.log)
            state.step += 1
            kill_point(f"step:{state.step}")  # test-only (mechscope.faults)
            bar.update(1)
            if progress and (state.step % 10 == 0 or state.step == steps):
                shown = postfix(state.log) if postfix is not None else (
                    None if loss is None else {"loss": f"{loss:.4f}"})
                if shown:
                    bar.set_postfix(shown, refresh=False)
            if after_step is not None and after_step(state.step, state.log):
                state.log["stopped_early_at"] = state.step
                return state, True
            if state.step == steps:
                if save_final:
                    save()
                break
            timed = every_seconds is not None and time.monotonic() - last_save >= every_seconds
            if state.step % every == 0 or timed or (stop_after is not None and state.step >= stop_after):
                save()
            if stop_after is not None and state.step >= stop_after:
                return state, False
    finally:
        bar.close()
    return state, True
