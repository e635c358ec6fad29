"""Read and write sparse coders in mechscope's own format and in the peers' formats.

    coder = load("path/to/sae")                 # native, SAELens, sparsify, Gemma Scope 1/2, dictionary_learning
    save(coder, "out/sae", format="saelens")    # files SAELens loads with identical encodings

Every format is a short mapping (one module each) onto SparseCoder's tensors; `build` checks names
and shapes before assigning, so a truncated or mismatched file raises CorruptFileError, and
nothing is ever unpickled beyond plain tensors. Saved files take raw activations (scales folded).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mechscope.errors import InputError
from mechscope.sae.coder import SparseCoder
from mechscope.sae.io import dictionary_learning, gemmascope, native, saelens, sparsify
from mechscope.sae.io.common import build
from mechscope.sae.io.detect import MultipleCodersError, coder_subfolders, detect_format, locate
from mechscope.validate import writable_dir

__all__ = ["FORMATS", "MultipleCodersError", "detect_format", "load", "load_all", "save"]

_READ: dict[str, Callable] = {
    "native": native.read, "saelens": saelens.read, "sparsify": sparsify.read, "gemmascope": gemmascope.read,
    "gemmascope2": gemmascope.read2, "dictionary_learning": dictionary_learning.read,
}
_WRITE: dict[str, Callable[[SparseCoder, Path], Path]] = {
    "native": native.write, "saelens": saelens.write, "sparsify": sparsify.write, "gemmascope": gemmascope.write,
    "gemmascope2": gemmascope.write2, "dictionary_learning": dictionary_learning.write,
}
FORMATS: tuple[str, ...] = tuple(_READ)


def load(path: str | os.PathLike, *, device=None, dtype=None, format: str | None = None,
         norm_scaling_factor: float | None = None) -> SparseCoder:
    """Load the sparse coder at `path` (a folder, or its weights file), detecting the format.

    dtype: the weights' dtype (default: the file's); JumpReLU/BatchTopK thresholds stay float32.
    norm_scaling_factor: SAELens SAEs trained with normalize_activations='expected_average_only_in'
    whose factor is not stored next to them (SAELens keeps it in its release table).
    """
    if format is None:
        format, where = locate(path)
    else:
        if format not in _READ:
            raise InputError(f"Unknown SAE format {format!r}; choose one of {', '.join(FORMATS)}.")
        where = Path(path)
    if norm_scaling_factor is not None and format != "saelens":
        raise InputError(f"norm_scaling_factor applies to SAELens files only; {path} is {format}.")
    kw = {"norm_scaling_factor": norm_scaling_factor} if format == "saelens" else {}
    cfg, tensors = _READ[format](where, **kw)
    return build(cfg, tensors, device=device, dtype=dtype, where=where)


def load_all(path: str | os.PathLike, *, device=None, dtype=None) -> dict[str, SparseCoder]:
    """Every coder in a folder of per-hook subfolders (sparsify runs, dictionary_learning sweeps),
    keyed by subfolder name; a folder holding one coder gives {its hook (or folder name): coder}."""
    path = Path(path)
    subs = coder_subfolders(path) if path.is_dir() and not _is_coder(path) else {}
    if not subs:
        coder = load(path, device=device, dtype=dtype)
        return {coder.cfg.hook_in or path.name: coder}
    return {name: load(where, device=device, dtype=dtype, format=fmt) for name, (fmt, where) in subs.items()}


def _is_coder(folder: Path) -> bool:
    try:
        return locate(folder)[1] == folder
    except Exception:  # noqa: BLE001 (several coders below, or none)
        return False


def save(coder: SparseCoder, path: str | os.PathLike, format: str = "native") -> Path:
    """Write `coder` into the folder `path` in `format` (one of FORMATS); returns the folder.

    Scales are folded on a copy first. An architecture the format cannot express raises
    UnsupportedArchitectureError rather than writing something the peer would read differently.
    """
    if format not in _WRITE:
        raise InputError(f"Unknown SAE format {format!r}; choose one of {', '.join(FORMATS)}.")
    writable_dir(path, flag=None, what="SAE folder", keep=False)  # a typed error, not a raw OSError half-way through
    return _WRITE[format](coder, Path(path))
