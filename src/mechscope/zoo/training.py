"""Shared pieces of the zoo's training loops: typed configs, per-step seeding, checkpoints, the loop.

Why one rule makes runs both reproducible and resumable: everything random at step s is drawn
from a generator seeded by (seed, step, stream), so the data of a step does not depend on what
ran before it. A checkpoint then only needs the model, the optimizer moments and the recipe's
JSON log at a step boundary; a resumed run replays exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechscope.errors import CorruptFileError, InputError
from mechscope.models.native import atomic_write_bytes

CHECKPOINT_DIR = ".checkpoint"
CHECKPOINT_VERSION = 1
NOT_COMPARED = {"checkpoint_every"}  # config fields that do not change the result


def step_generator(seed: int, step: int, stream: str = "data") -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): the data order of a resumed run."""
    digest = hashlib.sha256(f"mechscope.zoo:{stream}:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ------------------------------------------------------------------------------ typed overrides


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """dataclasses.replace with a typed check, so `lr="3e-3"` or a misspelt field fails loudly."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    for key, value in overrides.items():
        if key not in fields:
            raise InputError(f"{type(config).__name__} has no setting {key!r}; settings: {', '.join(fields)}.")
        if not _type_ok(value, hints[key]):
            want = getattr(hints[key], "__name__", str(hints[key]))
            raise InputError(f"{type(config).__name__}.{key} must be {want}, got {value!r}.")
    return dataclasses.replace(config, **overrides)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (tuple, list):  # tuple[float, ...] / list[int]: any sequence of the element type
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, tuple | list) and all(_type_ok(v, args[0]) for v in value) if args else True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def config_dict(config: Any) -> dict[str, Any]:
    """JSON-able dict of a config dataclass (tuples become lists, as they would on disk)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


# ------------------------------------------------------------------------------ checkpoints


@dataclass
class Progress:
    """Where a run stands: the next step to run and the recipe's JSON log (metrics, grok steps)."""

    step: int = 0
    log: dict[str, Any] = field(default_factory=dict)


class Checkpoint:
    """`out/.checkpoint/`: step-N.safetensors (model + optimizer tensors) and state.json.

    The tensor file is written first and state.json (which names it) last, each atomically, so a
    crash at any moment leaves a state.json that points at a complete tensor file.
    """

    def __init__(self, out: Path, recipe: str, seed: int, config: Any) -> None:
        self.dir = Path(out) / CHECKPOINT_DIR
        self.identity = {"recipe": recipe, "seed": seed, "config": config_dict(config)}

    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        from safetensors.torch import save

        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        for idx, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise InputError(f"Cannot checkpoint non-tensor optimizer state {key!r}.")
                tensors[f"optim/{idx}/{key}"] = value.detach().clone().contiguous()
        name = f"step-{progress.step:08d}.safetensors"
        atomic_write_bytes(self.dir / name, save(tensors, metadata={"format": "pt"}))
        state = {**self.identity, "format_version": CHECKPOINT_VERSION, "step": progress.step,
                 "tensors": name, "log": progress.log,
                 "data_order": "a function of (seed, step): nothing else to restore"}
        atomic_write_bytes(self.dir / "state.json", (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
        for old in self.dir.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Progress | None:
        """Restore model and optimizer in place; None when there is no checkpoint."""
        if not self.exists():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = json.loads((self.dir / "state.json").read_text())
            tensors = load_file(self.dir / state["tensors"])
        except (ValueError, KeyError, OSError, SafetensorError) as e:
            raise CorruptFileError(f"Unreadable checkpoint in {self.dir} ({e}); delete the folder to start over.") from e
        self._check_identity(state)
        model_sd = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
        model.load_state_dict(model_sd, strict=True)
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, idx, key = k.split("/", 2)
                optim_state.setdefault(int(idx), {})[key] = v
        # param groups (lr, betas, ...) come from the recipe's config, checked equal above
        optimizer.load_state_dict({"state": optim_state, "param_groups": optimizer.state_dict()["param_groups"]})
        return Progress(step=int(state["step"]), log=state.get("log", {}))

    def _check_identity(self, state: dict[str, Any]) -> None:
        def strip(d: dict[str, Any]) -> dict[str, Any]:
            cfg = {k: v for k, v in d.get("config", {}).items() if k not in NOT_COMPARED}
            return {"recipe": d.get("recipe"), "seed": d.get("seed"), "config": cfg}

        have, want = strip(state), strip(self.identity)
        if have != want:
            diff = [k for k in ("recipe", "seed") if have[k] != want[k]]
            diff += [k for k in set(have["config"]) | set(want["config"])
                     if have["config"].get(k) != want["config"].get(k)]
            raise InputError(
                f"{self.dir} holds an unfinished run with other settings ({', '.join(sorted(diff))} differ). "
                "Resume it with the same settings, or delete that folder (or pick another --out) to start over."
            )

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------ the loop


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    checkpoint: Checkpoint,
    steps: int,
    step_fn: Callable[[int, dict[str, Any]], float],
    every: int,
    after_step: Callable[[int, dict[str, Any]], bool] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    desc: str = "train",
) -> tuple[Progress, bool]:
    """Run step_fn(step) for the remaining steps, resuming from the checkpoint if there is one.

    step_fn(step, log) does one optimizer step and returns the loss. after_step(steps_done, log) may
    record metrics in the JSON log (saved in checkpoints) and return True to stop early. stop_after=K simulates an interrupt:
    checkpoint after K steps and return. Returns (progress, finished).
    """
    from tqdm.auto import tqdm

    state = checkpoint.load(model, optimizer) or Progress()
    bar = tqdm(total=steps, initial=state.step, disable=not progress, desc=desc, dynamic_ncols=True)
    try:
        while state.step < steps:
            loss = step_fn(state.step, state.log)
            state.step += 1
            bar.update(1)
            if state.step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if after_step is not None and after_step(state.step, state.log):
                state.log["stopped_early_at"] = state.step
                return state, True
            if stop_after is not None and state.step >= stop_after and state.step < steps:
                checkpoint.save(model, optimizer, state)
                return state, False
            if state.step % every == 0 and state.step < steps:
                checkpoint.save(model, optimizer, state)
    finally:
        bar.close()
    return state, True


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up then constant: a pure function of the step, so resuming needs no scheduler state."""
    return lr * min(1.0, (step + 1) / max(1, warmup))
