"""mechscope's own SAE folder: cfg.json (our SAEConfig, tagged) + sae.safetensors (our tensor names).

The only format that holds every architecture and field losslessly (log_threshold as trained,
matryoshka prefixes, transcoder hooks, provenance); the peers' formats are mappings onto it.
"""

from __future__ import annotations

from pathlib import Path

from mechscope.errors import CorruptFileError
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig
from mechscope.sae.io.common import prepare, read_json, read_safetensors, safetensors_bytes

FORMAT = "mechscope.sae"
FORMAT_VERSION = 1
CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"


def is_native(folder: Path) -> bool:
    try:
        return (folder / CONFIG).is_file() and read_json(folder / CONFIG).get("format") == FORMAT
    except CorruptFileError:
        return False


def read(folder: Path):
    raw = read_json(folder / CONFIG)
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptFileError(f"{folder} was written by a newer mechscope (format {raw['format_version']}); upgrade.")
    try:
        cfg = SAEConfig.from_dict(dict(raw["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{folder}/{CONFIG} has no valid SAE config ({e}).") from e
    return cfg, read_safetensors(folder / WEIGHTS)


def write(coder: SparseCoder, folder: Path) -> Path:
    cfg, sd = prepare(coder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS, safetensors_bytes(sd, {"format": "pt"}))
    atomic_write_json(folder / CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict()})
    return folder
