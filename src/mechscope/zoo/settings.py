"""What a zoo recipe is run with: typed overrides of its config, and its identity-checked checkpoint.

The training plumbing itself (seeded steps, schedules, checkpoints, the loop) is the package-wide
`mechscope.training`; this module adds only what is particular to recipes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from mechscope.errors import InputError
from mechscope.training import CHECKPOINT_DIR, Checkpoint, config_dict

NOT_COMPARED = {"checkpoint_every"}  # config fields that do not change the result


def recipe_checkpoint(out: Path, recipe: str, seed: int, config: Any) -> Checkpoint:
    """`out/.checkpoint/`, which resumes only the same recipe, seed and config (checkpoint_every aside)."""
    cfg = {k: v for k, v in config_dict(config).items() if k not in NOT_COMPARED}
    return Checkpoint(Path(out) / CHECKPOINT_DIR, {"recipe": recipe, "seed": seed, "config": cfg})


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
