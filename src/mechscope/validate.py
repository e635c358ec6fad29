"""Validation at the edges: one small set of checks used by every API entry point and CLI command.

Why one module: a count, a probability or an output folder is checked the same way everywhere, with a
message that names the argument, says what was wrong and what to do. Checks run *before* any work, so a
typo in `--out` or `--eval-tokens -5` costs a second, not an hour of training (and a negative count never
silently becomes a Python slice).

    n = count("n_tokens", n_tokens, min=1)              # int >= 1, bools and floats refused
    lr = finite_float("lr", lr, positive=True)          # refuses nan, inf, <= 0
    out = writable_dir(out, flag="--out")               # created and probed now, not after training

Every failure is a typed `mechscope.errors` exception (InputError or OutputNotWritableError), which the CLI
prints as one line and exits 2.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sized
from pathlib import Path
from typing import Any

from mechscope.errors import InputError, OutputNotWritableError

DTYPES = ("float32", "float16", "bfloat16", "float64")


def _label(name: str, flag: str | None) -> str:
    return f"{name} ({flag})" if flag else name


def count(name: str, value: Any, *, min: int = 0, flag: str | None = None) -> int:  # noqa: A002 (reads best)
    """`value` as an int >= min. Refuses bools, floats, strings and values below `min` (a negative count would
    otherwise become a Python slice: `x[:-5]` evaluates all but 5 rows)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{_label(name, flag)} must be a whole number >= {min}, got {value!r} "
                         f"({type(value).__name__}).")
    if value < min:
        raise InputError(f"{_label(name, flag)} must be >= {min}, got {value}; pass a value of at least {min}.")
    return int(value)


def positive_int(name: str, value: Any, *, flag: str | None = None) -> int:
    """`value` as an int >= 1."""
    return count(name, value, min=1, flag=flag)


def finite_float(name: str, value: Any, *, positive: bool = False, min: float | None = None,  # noqa: A002
                 max: float | None = None, flag: str | None = None) -> float:  # noqa: A002
    """`value` as a finite float (nan and inf refused), optionally > 0 or within [min, max]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{_label(name, flag)} must be a number, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{_label(name, flag)} must be a finite number, got {v}; pass a real value.")
    if positive and v <= 0:
        raise InputError(f"{_label(name, flag)} must be > 0, got {v}.")
    if min is not None and v < min or max is not None and v > max:
        lo = "-inf" if min is None else min
        hi = "inf" if max is None else max
        raise InputError(f"{_label(name, flag)} must be in [{lo}, {hi}], got {v}.")
    return v


def probability(name: str, value: Any, *, flag: str | None = None) -> float:
    """`value` as a finite float in [0, 1]."""
    return finite_float(name, value, min=0.0, max=1.0, flag=flag)


def nonempty(name: str, value: Any, *, what: str = "item") -> Any:
    """`value` if it is a non-empty sized collection; an empty one is refused by name (not as 'got list')."""
    if isinstance(value, Sized) and len(value) == 0:
        raise InputError(f"{name} is an empty {type(value).__name__}: give at least one {what}.")
    return value


def dtype(name: str, value: Any, *, allowed: tuple[str, ...] = DTYPES):
    """A torch dtype from a torch.dtype or its name ('float32', 'torch.bfloat16', 'bf16')."""
    import torch

    if isinstance(value, torch.dtype):
        s = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        s = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
             "float": "float32"}.get(value.lower(), value.lower().removeprefix("torch."))
    else:
        s = None
    if s not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}.")
    return getattr(torch, s)


def writable_dir(path: str | os.PathLike, *, flag: str | None = "--out", what: str = "output folder",
                 keep: bool = True) -> Path:
    """Create folder `path` (and parents) and prove a file can be written there -- before any work, so an
    unwritable output is found in a second rather than after hours of training. Returns the Path.
    keep=False removes again the (empty) folders this call created: for writers that may still refuse.

    Raises OutputNotWritableError naming the folder and the OS reason (permission, a file in the way,
    read-only disk, a path under /proc)."""
    p = Path(path).expanduser()
    where = f"{flag} {str(path)!r}" if flag else repr(str(path))
    if p.exists() and not p.is_dir():
        raise OutputNotWritableError(f"Cannot write the {what} {where}: it is a file, not a folder. Choose "
                                     "another path.")
    created = [q for q in (p, *p.parents) if not q.exists()]  # deepest first
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        if not keep:
            for q in created:
                q.rmdir()
    except OSError as e:
        raise OutputNotWritableError(f"Cannot write the {what} {where} ({e.strerror or e}); choose a writable "
                                     "folder or fix its permissions. Nothing was computed.") from e
    return p


def writable_file(path: str | os.PathLike, *, flag: str | None = "--out", what: str = "output file") -> Path:
    """Check that file `path` can be created (its folder is writable_dir-checked; the file is not created)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputNotWritableError(f"Cannot write the {what} {str(path)!r}: it is a folder. Give a file path.")
    writable_dir(p.parent if str(p.parent) else ".", flag=flag, what=f"folder of the {what}")
    return p


__all__ = ["DTYPES", "count", "dtype", "finite_float", "nonempty", "positive_int", "probability", "writable_dir",
           "writable_file"]
