"""Monitors on disk: monitors.json (specs) + monitors.safetensors (direction tensors), probes and SAEs by path.

    save_monitors("mon/", ms)            # mon/monitors.json, mon/monitors.safetensors, mon/probe-0/, mon/sae-1/
    ms = load_monitors("mon/", model)    # or load_monitors("mon/monitors.json", model)

A probe or SAE given as an object is saved next to the JSON (probe-<i>/, sae-<i>/); one loaded from a folder is
referenced by its path relative to the JSON (not copied). Loading checks the model: the file's recorded
identity (if saved with model=), each probe's and SAE's own identity, and that each probe / SAE still reads
the hook the JSON says (ArtifactMismatchError otherwise). Steering interventions are stored with
edit.to_json; ClampFeatures as {"kind": "clamp_features", "sae": path, "values", "scale"}.
FunctionMonitor holds code and on_alert callbacks are code: neither is saved (pass on_alert= to load).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import (
    ArtifactMismatchError,
    CorruptFileError,
    InputError,
    MechscopeError,
    OutputNotWritableError,
)
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.models.identity import model_identity, same_model
from mechscope.monitor.monitors import (
    DirectionMonitor,
    FeatureMonitor,
    FunctionMonitor,
    Monitor,
    ProbeMonitor,
    check_monitors,
)

FORMAT = "mechscope.monitors"
SCHEMA_VERSION = 1
JSON_NAME, TENSORS_NAME = "monitors.json", "monitors.safetensors"


def _paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(folder, json file, tensors file) for a folder or a path to its monitors.json."""
    p = Path(path)
    if p.suffix == ".json":
        return p.parent, p, p.with_suffix(".safetensors")
    return p, p / JSON_NAME, p / TENSORS_NAME


def _rel(target: Path, folder: Path) -> str:
    return os.path.relpath(Path(target).resolve(), folder.resolve())


def _steer_to_json(iv, folder: Path, name: str, index: int) -> dict[str, Any]:
    from mechscope.edit import ClampFeatures, to_json
    from mechscope.sae import save as save_sae

    if isinstance(iv, ClampFeatures):
        if iv.positions is not None:
            raise InputError(f"Monitor {name!r}: a ClampFeatures steer with positions= cannot be saved (the "
                             "monitor chooses where steering starts); drop positions=.")
        where = save_sae(iv.coder, folder / f"steer-sae-{index}")
        return {"kind": "clamp_features", "sae": _rel(where, folder), "values": iv.values, "scale": iv.scale}
    return to_json(iv)


def save_monitors(path: str | os.PathLike, monitors: Sequence[Monitor], *, model=None) -> Path:
    """Write monitors (see the module docstring); model= records its identity so loading refuses another
    model even for monitors without a probe or SAE. Returns the JSON file's path."""
    from safetensors.torch import save as save_tensors

    from mechscope.sae import save as save_sae

    items = check_monitors(monitors)
    folder, json_path, tensors_path = _paths(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputNotWritableError(f"Cannot create the monitor folder {folder}: {e}.") from e
    specs, tensors = [], {}
    for i, m in enumerate(items):
        spec = m.describe()
        if isinstance(m, FunctionMonitor):
            raise InputError(f"Monitor {m.name!r} is a FunctionMonitor (code, not data): it cannot be saved; save "
                             "a DirectionMonitor, ProbeMonitor or FeatureMonitor instead.")
        if isinstance(m, ProbeMonitor):
            where = m.source if m.source is not None else m.probe.save(folder / f"probe-{i}")
            spec["probe"] = _rel(where, folder)
        elif isinstance(m, FeatureMonitor):
            where = m.source if m.source is not None else save_sae(m.coder, folder / f"sae-{i}")
            spec["sae"] = _rel(where, folder)
        elif isinstance(m, DirectionMonitor):
            key = f"direction.{i}"
            tensors[key] = m.vector.float().contiguous()
            spec["direction"] = key
        else:
            raise InputError(f"Monitor {m.name!r} ({type(m).__name__}) has no file form.")
        if m.steer:
            spec["steer"] = [_steer_to_json(iv, folder, m.name, 100 * i + j) for j, iv in enumerate(m.steer)]
        specs.append(spec)
    doc = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
           "model": None if model is None else model_identity(model), "monitors": specs}
    atomic_write_bytes(tensors_path, save_tensors(tensors) if tensors else save_tensors({}))
    atomic_write_json(json_path, doc)
    return json_path


def _steer_from_json(d: Any, folder: Path, model) -> Any:
    from mechscope.edit import ClampFeatures, from_json
    from mechscope.sae import load as load_sae

    if isinstance(d, dict) and d.get("kind") == "clamp_features":
        coder = load_sae(folder / str(d.get("sae")), device=model.device)
        return ClampFeatures(coder, values={int(k): v for k, v in (d.get("values") or {}).items()},
                             scale={int(k): v for k, v in (d.get("scale") or {}).items()})
    return from_json(d)


def load_monitors(path: str | os.PathLike, model, *, on_alert: Callable | None = None) -> list[Monitor]:
    """Read monitors saved by save_monitors and check them against `model` (typed errors: CorruptFileError for
    a malformed file or another schema version, ArtifactMismatchError for another model's probe / SAE / file
    or a probe / SAE that reads another hook, InputError for bad values such as a threshold that is not a
    number). on_alert: given to every loaded monitor with an alert / stop / steer action."""
    from safetensors import SafetensorError, safe_open


    folder, json_path, tensors_path = _paths(path)
    if not json_path.exists():
        raise CorruptFileError(f"No {json_path.name} at {json_path}; write one with monitor.save_monitors.")
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"Could not read {json_path}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptFileError(f"{json_path} is not a mechscope monitor file (format {FORMAT!r}).")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise CorruptFileError(f"{json_path} has monitor schema_version {doc.get('schema_version')!r}; this mechscope "
                               f"reads version {SCHEMA_VERSION}. Re-save the monitors with this version.")
    want = doc.get("model")
    if want:
        key = same_model(want, model_identity(model))
        if key is not None:
            raise ArtifactMismatchError(f"The monitors in {json_path} were saved for {want.get('name')!r} ({key} "
                                        f"{want.get(key)}), not for the model given ({model.cfg.model_name!r}).")
    tensors: dict[str, torch.Tensor] = {}
    if tensors_path.exists():
        try:
            with safe_open(str(tensors_path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptFileError(f"Could not read {tensors_path}: {e}") from e
    specs = doc.get("monitors")
    if not isinstance(specs, list):
        raise CorruptFileError(f"{json_path}: 'monitors' must be a list.")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise CorruptFileError(f"{json_path}: monitor {i} is not an object.")
        try:
            out.append(_from_json(spec, model, folder, tensors, on_alert))
        except KeyError as e:
            if isinstance(e, MechscopeError):  # HookNameError is a KeyError too
                raise
            raise CorruptFileError(f"{json_path}: monitor {i} lacks the field {e.args[0]!r}.") from None
    return check_monitors(out)


def monitor_from_json(spec: dict[str, Any], model, *, base: str | os.PathLike | None = None,
                      tensors: dict[str, torch.Tensor] | None = None, on_alert: Callable | None = None) -> Monitor:
    """One monitor from its JSON spec (an entry of monitors.json, or what a service receives), checked against
    `model`. Probe / SAE paths are relative to `base` (default: the working directory); a direction is a key
    of `tensors` or an inline list of floats. A missing field or a bad value raises InputError."""
    if not isinstance(spec, dict):
        raise InputError(f"A monitor spec is a JSON object, got {type(spec).__name__}.")
    try:
        return _from_json(spec, model, Path(base) if base is not None else Path("."), tensors, on_alert)
    except KeyError as e:
        if isinstance(e, MechscopeError):  # HookNameError is a KeyError too
            raise
        raise InputError(f"The monitor spec lacks the field {e.args[0]!r} (needs kind, name, hook, threshold "
                         "and the kind's own: probe, sae + latents, or direction).") from None


def _from_json(spec: dict[str, Any], model, folder: Path, tensors: dict[str, torch.Tensor] | None,
               on_alert: Callable | None) -> Monitor:
    from mechscope.probes import load as load_probe
    from mechscope.sae import load as load_sae

    kind, name, hook = spec["kind"], spec["name"], spec["hook"]
    common: dict[str, Any] = {"window": spec.get("window", 1), "hysteresis": spec.get("hysteresis", 0.0),
                              "action": spec.get("action", "record"), "scope": spec.get("scope", "all")}
    if spec.get("steer"):
        steer = spec["steer"]
        common["steer"] = [_steer_from_json(d, folder, model) for d in (steer if isinstance(steer, list) else [steer])]
    if on_alert is not None and common["action"] != "record":
        common["on_alert"] = on_alert
    if kind == "probe":
        probe = load_probe(folder / str(spec["probe"]), model=model, hook=hook)
        m: Monitor = ProbeMonitor(name, probe, threshold=spec["threshold"], **common)
        m.source = folder / str(spec["probe"])  # re-saving references it again
    elif kind == "feature":
        coder = load_sae(folder / str(spec["sae"]), device=model.device)
        if coder.cfg.hook_in != hook:
            raise ArtifactMismatchError(f"Monitor {name!r}: the SAE at {spec['sae']} reads {coder.cfg.hook_in}, "
                                        f"but the monitor spec says {hook}.")
        m = FeatureMonitor(name, coder, latents=spec["latents"], threshold=spec["threshold"],
                           reduce=spec.get("reduce", "max"), **common)
        m.source = folder / str(spec["sae"])
    elif kind == "direction":
        d = spec["direction"]
        if isinstance(d, str):
            if tensors is None or d not in tensors:
                raise CorruptFileError(f"The tensor {d!r} of monitor {name!r} is missing from monitors.safetensors.")
            d = tensors[d]
        else:
            try:
                d = torch.tensor(d, dtype=torch.float32)
            except (TypeError, ValueError):
                raise InputError(f"Monitor {name!r}: direction must be a list of numbers.") from None
        m = DirectionMonitor(name, hook, d, threshold=spec["threshold"], **common)
    else:
        raise CorruptFileError(f"Monitor {name!r} has unknown kind {kind!r} (probe, feature, direction; function "
                               "monitors are never saved).")
    m.check(model)
    return m


__all__ = ["FORMAT", "SCHEMA_VERSION", "load_monitors", "monitor_from_json", "save_monitors"]
