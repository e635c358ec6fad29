"""Which format a path holds, from file names and (for cfg.json folders) one config key.

A folder with cfg.json is native if tagged `"format": "mechscope.sae"`, SAELens if it has
sae_weights.safetensors, sparsify if it has sae.safetensors. A folder holding several coders (a
sparsify run: one folder per hookpoint; dictionary_learning: trainer_0, trainer_1, ...) is not
guessed at: it raises MultipleCodersError naming them (use load_all or a subfolder).
"""

from __future__ import annotations

from pathlib import Path

from mechscope.errors import InputError, UnknownFormatError
from mechscope.sae.io.native import is_native

LOOKED_FOR = (
    "native: cfg.json tagged format 'mechscope.sae' + sae.safetensors; "
    "saelens: cfg.json + sae_weights.safetensors; sparsify: cfg.json + sae.safetensors; "
    "gemmascope: params.npz; gemmascope2: params.safetensors (+ config.json); "
    "dictionary_learning: ae.pt (+ config.json)"
)


class MultipleCodersError(InputError):
    """The folder holds several coders (one per subfolder); load one, or all with load_all."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = path, names
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        super().__init__(f"{path} holds {len(names)} sparse coders: {shown}. Load one with "
                         f"load('{path}/<name>'), or all with load_all('{path}').")


def _folder_format(folder: Path) -> str | None:
    if (folder / "cfg.json").is_file():
        if is_native(folder):
            return "native"
        if (folder / "sae_weights.safetensors").is_file():
            return "saelens"
        if (folder / "sae.safetensors").is_file():
            return "sparsify"
    for name, fmt in (("params.npz", "gemmascope"), ("params.safetensors", "gemmascope2"),
                      ("ae.pt", "dictionary_learning")):
        if (folder / name).is_file():
            return fmt
    return None


def _file_format(path: Path) -> tuple[str, Path] | None:
    name = path.name
    if name in ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "config.json", "mechscope_config.json"):
        fmt = _folder_format(path.parent)
        return (fmt, path.parent) if fmt else None
    if path.suffix == ".npz":
        return "gemmascope", path
    if name == "params.safetensors":
        return "gemmascope2", path
    if path.suffix == ".pt":
        return "dictionary_learning", path
    return None


def coder_subfolders(folder: Path) -> dict[str, tuple[str, Path]]:
    """Immediate subfolders that hold a coder: name -> (format, path)."""
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        fmt = _folder_format(sub)
        if fmt:
            found[sub.name] = (fmt, sub)
    return found


def locate(path: str | Path) -> tuple[str, Path]:
    """(format, the folder or file its reader takes). One-coder parents resolve to their coder."""
    path = Path(path)
    if not path.exists():
        raise UnknownFormatError(f"No sparse coder at {path}: the path does not exist.")
    if path.is_file():
        hit = _file_format(path)
        if hit is None:
            raise UnknownFormatError(f"{path} is not a sparse coder file we can read. Looked for {LOOKED_FOR}.")
        return hit
    fmt = _folder_format(path)
    if fmt:
        return fmt, path
    _refuse_transcoder_set(path)
    subs = coder_subfolders(path)
    if len(subs) == 1:
        return next(iter(subs.values()))
    if subs:
        raise MultipleCodersError(path, list(subs))
    raise UnknownFormatError(f"No sparse coder found in {path}. Looked for {LOOKED_FOR} "
                             "(in the folder or one level below).")


def _refuse_transcoder_set(folder: Path) -> None:
    """A model's whole set of transcoders (ours or circuit-tracer's) is not one coder: say what loads it."""
    from mechscope.sae.io import circuit_tracer

    if (folder / "transcoders.json").is_file():
        what = "a mechscope transcoder set"
    else:
        try:
            kind = circuit_tracer.detect(folder)
        except Exception:  # noqa: BLE001 (an unreadable config.yaml: load_transcoders reports it)
            kind = None
        if kind is None:
            return
        what = f"circuit-tracer transcoders ({'cross-layer' if kind == 'clt' else 'per-layer'})"
    raise UnknownFormatError(f"{folder} holds {what}, not one sparse coder: load it with "
                             f"mechscope.sae.load_transcoders('{folder}').")


def detect_format(path: str | Path) -> str:
    """The format name of the coder at `path` (see FORMATS)."""
    return locate(path)[0]
