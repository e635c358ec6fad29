"""Safe, lazy access to checkpoint tensors by (prefix-stripped) HF name.

Only safetensors are read directly; a `.bin` checkpoint is read with
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects. Tensors are read
one at a time when a converter asks for them, so loading never holds two full copies.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from mechscope.errors import CorruptFileError, ModelNotFoundError


class Weights:
    """name -> tensor, with known prefixes ("model.", "transformer.") stripped from the keys."""

    def __init__(self, loaders: Mapping[str, Callable[[], torch.Tensor]], prefixes: Iterable[str] = ()):
        self._loaders: dict[str, Callable[[], torch.Tensor]] = {}
        prefixes = tuple(prefixes)
        for name, load in loaders.items():
            short = name
            for p in prefixes:
                if short.startswith(p):
                    short = short[len(p) :]
                    break
            self._loaders[short] = load

    def __contains__(self, name: str) -> bool:
        return name in self._loaders

    def keys(self) -> list[str]:
        return list(self._loaders)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            load = self._loaders[name]
        except KeyError:
            raise CorruptFileError(
                f"Checkpoint lacks tensor {name!r} (have e.g. {sorted(self._loaders)[:6]}); "
                "the files are incomplete or do not match config.json."
            ) from None
        return load()

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefixes: Iterable[str] = ()) -> Weights:
        return cls({k: (lambda v=v: v) for k, v in sd.items()}, prefixes)

    @classmethod
    def from_folder(cls, folder: Path, prefixes: Iterable[str] = ()) -> Weights:
        folder = Path(folder)
        st = sorted(folder.glob("*.safetensors"))
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CorruptFileError(f"{index} is not a valid safetensors index: {e}") from e
            st = [folder / f for f in files]
        if st:
            return cls(_safetensors_loaders(st), prefixes)
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if bins:
            return cls(_torch_bin_loaders(bins), prefixes)
        raise ModelNotFoundError(
            f"No weights in {folder}: expected model.safetensors (or sharded safetensors) or pytorch_model.bin."
        )


def _safetensors_loaders(files: list[Path]) -> dict[str, Callable[[], torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for f in files:
        if not f.exists():
            raise CorruptFileError(f"Missing weight shard {f}.")
        try:
            handle = safe_open(str(f), framework="pt")  # memory-mapped; kept open while loading
            names = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptFileError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it.") from e

        def load(name: str, handle=handle, f: Path = f) -> torch.Tensor:
            try:
                return handle.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptFileError(f"Could not read {name!r} from {f}: {e}") from e

        for n in names:
            loaders[n] = lambda n=n, load=load: load(n)
    return loaders


def _torch_bin_loaders(files: list[Path]) -> dict[str, Callable[[], torch.Tensor]]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            # mmap (no copy) needs the zip format; a legacy (torch < 1.6) .bin is read whole, still weights_only
            part = torch.load(str(f), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:  # UnpicklingError for unsafe content, RuntimeError for corrupt zips
            raise CorruptFileError(
                f"Refused to load {f}: it is not a plain tensor checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). mechscope never unpickles arbitrary "
                "objects; convert the checkpoint to safetensors with a trusted tool."
            ) from e
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CorruptFileError(f"{f} does not hold a name -> tensor state dict.")
        sd.update(part)
    return {k: (lambda v=v: v) for k, v in sd.items()}
