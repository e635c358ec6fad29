"""One notion of a cached step: "is this step already done with these settings, on these inputs?"

    key = step_key({"tokens": 4096, "k": 4}, {"model": model_identity(model), "harvest": harvest_key})
    record = done(folder, key)            # the StepRecord written when it last finished, or None
    if record is None:
        result = build()
        mark_done(folder, key, result)    # folder/step.json, written atomically

A step's key is a stable hash of two JSON documents: its *settings* (what the user chose) and the
*identity of its inputs* (the model by content -- `mechscope.models.identity.model_identity`, never its
path --, and the keys of the steps it reads). Changing a setting, the model, or anything upstream
therefore changes the key, and nothing else does. The record file is written last and atomically, so
a step killed half-way is never taken for done.

Used by the harvest's resume check, the features pipeline (steps.json) and the report's stages
(artifacts/<stage>/stage.json).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechscope.fileio import atomic_write_json

STEP_FILE = "step.json"


def canonical_json(obj: Any) -> str:
    """The JSON text a key hashes: sorted keys, no whitespace; non-JSON values (paths, dtypes) as str()."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def step_key(settings: Any, inputs: Any = None) -> str:
    """16 hex digits identifying (settings, identity of the inputs); stable across runs and machines."""
    return hashlib.sha256(canonical_json({"settings": settings, "inputs": inputs}).encode()).hexdigest()[:16]


@dataclass
class StepRecord:
    """What finishing a step leaves behind: its key, how long it took and its small JSON result."""

    key: str
    result: Any = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def done(folder: str | Path, key: str, *, name: str = STEP_FILE) -> StepRecord | None:
    """The record of `folder/name` if the step finished under `key`; None if it never finished, finished
    under another key, or its record is unreadable (then it simply runs again)."""
    path = Path(folder) / name
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("key") != key:
        return None
    extra = {k: v for k, v in d.items() if k not in ("key", "result", "seconds")}
    return StepRecord(key=key, result=d.get("result"), seconds=float(d.get("seconds") or 0.0), extra=extra)


def mark_done(folder: str | Path, key: str, result: Any = None, *, seconds: float = 0.0, name: str = STEP_FILE,
              **extra: Any) -> StepRecord:
    """Record (atomically) that the step in `folder` finished under `key` with `result` (JSON-able)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / name, {"key": key, "seconds": seconds, "result": result, **extra})
    return StepRecord(key=key, result=result, seconds=seconds, extra=dict(extra))


def forget(folder: str | Path, *, name: str = STEP_FILE) -> None:
    """Remove a step's record so it runs again (its folder's other files are left to the step)."""
    (Path(folder) / name).unlink(missing_ok=True)


__all__ = ["STEP_FILE", "StepRecord", "canonical_json", "done", "forget", "mark_done", "step_key"]
