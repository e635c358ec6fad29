"""Atomic file writes: every artifact is written to a temp file in its folder and renamed.

A reader (or a resumed run) therefore sees either the old file or the whole new one, never
half of it. Errors (a full disk) remove the temp file and leave the old file untouched. A process
killed mid-write cannot remove its temp file: the next write of the same file (and the next run of a
harvest or a checkpointed training, via `remove_temp_files`) deletes it, so none stays behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mechscope.faults import kill_point


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp makes temp files 0600)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    remove_temp_files(path.parent, path.name)  # left by a killed writer of this very file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # not on Windows before 3.13
            os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            kill_point(f"write:{path.name}")  # test-only (mechscope.faults): die with the temp file written
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temp_files(folder: str | os.PathLike, name: str = "*") -> int:
    """Delete the temp files `atomic_write_bytes` left in `folder` for file `name` (a glob; default all).

    Only names of the form .<name>.<random>.tmp are touched. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(f".{name}.*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
