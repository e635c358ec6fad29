"""Config dataclasses from plain dicts (JSON files, saved artifacts): one helper instead of one copy per config.

Why one helper: every config (ModelConfig, SAEConfig, TrainConfig, ...) is stored as JSON next to what it
made and read back on load. Reading must refuse keys the dataclass does not have (a typo, or a file from
a newer mechscope) with a typed error that names them, rather than dropping them silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from mechscope.errors import InputError

T = TypeVar("T")


def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """`cls(**d)` for a dataclass `cls`, after refusing a non-mapping or keys that are not fields of `cls`
    (InputError naming the unknown keys and listing the known ones). Validation of values is the
    dataclass' own (`__post_init__`)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass, got {cls!r}.")
    if not isinstance(d, Mapping):
        raise InputError(f"A {cls.__name__} is read from a dict, got {type(d).__name__}.")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(d) - names
    if unknown:
        raise InputError(f"Unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(names)}.")
    return cls(**d)


__all__ = ["from_dict"]
