"""Safe, lazy access to checkpoint tensors by (prefix-stripped) HF name.

Only safetensors are read directly; a `.bin` checkpoint is read with
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects. Tensors are read
one at a time when a converter asks for them, so loading never holds two full copies.

Tensors read from a folder are views of a *private* (copy-on-write) memory map of the file: both
`safe_open(..., framework="pt")` and `torch.load(mmap=True, weights_only=True)` map with `UntypedStorage.from_file(shared=False)`.
So the model can adopt them as its parameters with no copy (`place`), and a later in-place edit
(process_weights, an ablation that edits a weight) copies the touched pages into private memory
instead of writing into the user's file (tests/models/test_load_zero_copy.py checks both). The
model then keeps the file mapped; replacing the file atomically (rename, as `mechscope.fileio`
does) is safe, truncating it in place while a model uses it is not.
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

    def __init__(self, loaders: Mapping[str, Callable[[], torch.Tensor]], prefixes: Iterable[str] = (), *,
                 mapped: bool = False):
        # mapped: the tensors are views of a privately mapped file, nobody else's memory, so a model may
        # adopt them as is; False (tensors of an in-memory model) means every tensor must be copied.
        self.mapped = mapped
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
            return cls(_safetensors_loaders(st), prefixes, mapped=True)
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if bins:
            return cls(_torch_bin_loaders(bins), prefixes, mapped=True)
        raise ModelNotFoundError(
            f"No weights in {folder}: expected model.safetensors (or sharded safetensors) or pytorch_model.bin."
        )


def place(t: torch.Tensor, *, dtype: torch.dtype, device: torch.device, adopt: bool) -> torch.Tensor:
    """`t` as a parameter in its final dtype/device: `t` itself where `adopt` and it already is one, else
    exactly one copy.

    A dense layout fits: contiguous, or a transposed 2-d matrix such as GPT-2's Conv1D weights, which
    F.linear uses without a copy (as transformers' Conv1D does). A copy keeps that layout, so the
    parameters, and hence the logits bit for bit, are the same whether a tensor was adopted or copied
    (from a folder or from an in-memory model, in the file's dtype or another).
    """
    transposed = t.ndim == 2 and not t.is_contiguous() and t.T.is_contiguous()
    if adopt and (t.is_contiguous() or transposed) and t.dtype == dtype and t.device == device:
        return t
    if transposed:
        return torch.empty(t.T.shape, dtype=dtype, device=device).copy_(t.T).T
    return torch.empty(t.shape, dtype=dtype, device=device).copy_(t)


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
