"""TranscoderSet: a model's replacement MLPs, one uniform interface over every kind of transcoder.

    ts = TranscoderSet.from_coders([coder_0, ..., coder_{L-1}])   # per-layer (PLT) or skip transcoders
    ts = TranscoderSet.from_clt(clt)                                # a CrossLayerTranscoder
    ts.check_model(model)                                           # typed error unless they fit
    acts = ts.encode(layer, x); W = ts.decoder(src, dst)            # what attribution graphs need

Why one interface: attribution graphs, replacement-model CE and feature dashboards only need "what
does layer l's feature read (encode), what does it write to MLP output m (decoder), plus the
linear skip path and bias". A per-layer transcoder writes only to its own layer (decoder(src, dst)
is None for dst != src); a cross-layer transcoder writes to its layer and every later one.
All tensors take and give RAW activations (input/output scales are applied here).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mechscope.errors import CorruptFileError, InputError

if TYPE_CHECKING:
    from mechscope.sae.clt import CrossLayerTranscoder
    from mechscope.sae.coder import SparseCoder

FORMAT = "mechscope.transcoders"
FORMAT_VERSION = 1
MANIFEST = "transcoders.json"
DEFAULT_INPUT_HOOK = "blocks.{l}.ln2.hook_normalized"
DEFAULT_OUTPUT_HOOK = "blocks.{l}.hook_mlp_out"


class TranscoderMismatchError(InputError):
    """Transcoders that do not fit a model (hooks, widths, layer count or model identity)."""


class TranscoderSet(nn.Module):
    """The replacement MLPs of one model: per-layer coders (`coders`) or one cross-layer transcoder (`clt`).

    Layer l's features read `input_hooks[l]` and write (a prediction of) `output_hooks[l]`; a CLT's
    layer-l features also write to output_hooks[m] for every m > l.
    """

    def __init__(self, *, coders: Sequence[SparseCoder] | None = None, clt: CrossLayerTranscoder | None = None,
                 input_hooks: Sequence[str], output_hooks: Sequence[str], model_name: str | None = None,
                 model_identity: dict[str, Any] | None = None) -> None:
        super().__init__()
        if (coders is None) == (clt is None):
            raise InputError("A TranscoderSet holds either per-layer coders or one cross-layer transcoder.")
        self.coders = nn.ModuleList(coders) if coders is not None else None
        self.clt = clt
        self.input_hooks, self.output_hooks = list(input_hooks), list(output_hooks)
        self.model_name, self.model_identity = model_name, model_identity
        n = len(self.coders) if self.coders is not None else clt.cfg.n_layers  # type: ignore[union-attr]
        if len(self.input_hooks) != n or len(self.output_hooks) != n:
            raise InputError(f"{n} transcoder layers but {len(self.input_hooks)} input hooks and "
                             f"{len(self.output_hooks)} output hooks.")
        _check_hook_layers(self.input_hooks, "input")
        _check_hook_layers(self.output_hooks, "output")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_coders(cls, coders: Sequence[SparseCoder], *, input_hook: str | None = None,
                    output_hook: str | None = None) -> TranscoderSet:
        """Per-layer (or skip) transcoders, coders[l] replacing layer l's MLP.

        Hooks come from each coder's cfg.hook_in / hook_out; input_hook / output_hook (templates
        with "{l}", e.g. "blocks.{l}.ln2.hook_normalized") fill in coders that record none.
        """
        from mechscope.sae.coder import SparseCoder

        coders = list(coders)
        if not coders:
            raise InputError("from_coders needs one transcoder per layer, got an empty list.")
        bad = [type(c).__name__ for c in coders if not isinstance(c, SparseCoder)]
        if bad:
            raise InputError(f"from_coders takes SparseCoder objects, got {bad[0]}.")
        ins, outs = [], []
        for i, c in enumerate(coders):
            h_in = c.cfg.hook_in or (input_hook.format(l=i) if input_hook else None)
            h_out = c.cfg.hook_out or (output_hook.format(l=i) if output_hook else None)
            if h_in is None or h_out is None:
                raise InputError(f"coders[{i}] records no hook_in/hook_out: pass input_hook= and output_hook= "
                                 f"templates, e.g. input_hook={DEFAULT_INPUT_HOOK!r}, "
                                 f"output_hook={DEFAULT_OUTPUT_HOOK!r}.")
            if h_out == h_in:
                raise InputError(f"coders[{i}] reads and writes {h_in}: it is an autoencoder, not a transcoder.")
            ins.append(h_in)
            outs.append(h_out)
        names = {c.cfg.model_name for c in coders} - {None}
        idents = [c.cfg.model_identity for c in coders if c.cfg.model_identity]
        return cls(coders=coders, input_hooks=ins, output_hooks=outs,
                   model_name=names.pop() if len(names) == 1 else None, model_identity=idents[0] if idents else None)

    @classmethod
    def from_clt(cls, clt: CrossLayerTranscoder) -> TranscoderSet:
        """A cross-layer transcoder (its config names its hooks and model)."""
        c = clt.cfg
        return cls(clt=clt, input_hooks=c.input_hooks, output_hooks=c.output_hooks, model_name=c.model_name,
                   model_identity=c.model_identity)

    # ------------------------------------------------------------------ shape
    @property
    def n_layers(self) -> int:
        return len(self.input_hooks)

    @property
    def cross_layer(self) -> bool:
        return self.clt is not None

    @property
    def has_skip(self) -> bool:
        if self.coders is not None:
            return any(c.cfg.skip for c in self.coders)
        return self.clt.has_skip  # type: ignore[union-attr]

    @property
    def d_in(self) -> list[int]:
        if self.coders is not None:
            return [c.cfg.d_in for c in self.coders]
        return [self.clt.cfg.d_in] * self.n_layers  # type: ignore[union-attr]

    @property
    def d_out(self) -> list[int]:
        if self.coders is not None:
            return [c.cfg.out_dim for c in self.coders]
        return [self.clt.cfg.d_out] * self.n_layers  # type: ignore[union-attr]

    @property
    def n_features(self) -> list[int]:
        if self.coders is not None:
            return [c.cfg.n_latents for c in self.coders]
        return [self.clt.cfg.n_features] * self.n_layers  # type: ignore[union-attr]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _layer(self, layer: int, what: str = "layer") -> int:
        if not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers:
            raise InputError(f"{what} {layer!r} is out of range: these transcoders cover layers 0..{self.n_layers - 1}.")
        return layer % self.n_layers

    # ------------------------------------------------------------------ the maths attribution needs
    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] raw activation at input_hooks[layer] -> feature acts [..., n_features[layer]] (dense)."""
        layer = self._layer(layer)
        if self.coders is not None:
            return self.coders[layer].encode(x)
        return self.clt.encode(layer, x)  # type: ignore[union-attr]

    def pre_acts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> pre-activations [..., n_features[layer]] (before the sparsifying nonlinearity)."""
        layer = self._layer(layer)
        if self.coders is not None:
            return self.coders[layer].pre_acts(x)
        return self.clt.pre_acts(layer, x)  # type: ignore[union-attr]

    def encoder(self, layer: int) -> torch.Tensor:
        """[d_in, n_features[layer]]: the linear read direction of each feature on RAW input (pre = x @ W + b).

        Autoencoder-style b_dec subtraction never applies to transcoders, so this is exact."""
        layer = self._layer(layer)
        if self.coders is not None:
            c = self.coders[layer]
            return c.W_enc * c.cfg.input_scale if c.cfg.input_scale != 1.0 else c.W_enc
        return self.clt.encoder(layer)  # type: ignore[union-attr]

    def decoder(self, src: int, dst: int) -> torch.Tensor | None:
        """[n_features[src], d_out]: what feature i of layer src writes to output_hooks[dst] (per unit of
        activation); None if layer src's features write nothing there (dst < src, or dst != src for a PLT)."""
        src, dst = self._layer(src, "src"), self._layer(dst, "dst")
        if self.coders is not None:
            if src != dst:
                return None
            c = self.coders[src]
            return c.W_dec / c.cfg.output_scale if c.cfg.output_scale != 1.0 else c.W_dec
        return self.clt.decoder(src, dst)  # type: ignore[union-attr]

    def skip_out(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., d_in] -> [..., d_out] the linear skip path of layer `layer`, or None without one."""
        layer = self._layer(layer)
        if self.coders is not None:
            c = self.coders[layer]
            if not c.cfg.skip:
                return None
            out = (x.to(c.W_skip.dtype) * c.cfg.input_scale) @ c.W_skip.T
            return out / c.cfg.output_scale if c.cfg.output_scale != 1.0 else out
        return self.clt.skip_out(layer, x)  # type: ignore[union-attr]

    def bias(self, layer: int) -> torch.Tensor:
        """[d_out] the output bias of layer `layer` (what it writes with no feature active)."""
        layer = self._layer(layer)
        if self.coders is not None:
            c = self.coders[layer]
            return c.b_dec / c.cfg.output_scale if c.cfg.output_scale != 1.0 else c.b_dec
        return self.clt.b_dec[layer]  # type: ignore[union-attr]

    def reconstruct(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """xs: per layer [..., d_in] inputs -> per layer [..., d_out] predicted MLP outputs."""
        if len(xs) != self.n_layers:
            raise InputError(f"reconstruct needs one input per layer ({self.n_layers}), got {len(xs)}.")
        if self.coders is not None:
            return [c(x).out for c, x in zip(self.coders, xs, strict=True)]
        return self.clt.reconstruct(list(xs))  # type: ignore[union-attr]

    def output(self, layer: int, acts: Sequence[torch.Tensor | None], x: torch.Tensor | None = None) -> torch.Tensor:
        """MLP-output prediction of layer `layer` from feature acts of layers <= layer (acts[s] [..., n_s]; None
        or missing: no contribution) and, for skip transcoders, the layer's own input x [..., d_in]."""
        layer = self._layer(layer)
        out = self.bias(layer)
        for src in range(layer + 1):
            w = self.decoder(src, layer)
            if w is not None and src < len(acts) and acts[src] is not None:
                out = out + acts[src].to(w.dtype) @ w  # type: ignore[union-attr]
        if self.has_skip:
            if x is None:
                raise InputError("Skip transcoders need the layer's input: output(layer, acts, x).")
            skip = self.skip_out(layer, x)
            if skip is not None:
                out = out + skip
        return out

    # ------------------------------------------------------------------ the model
    def check_model(self, model: Any, *, all_layers: bool = True) -> None:
        """TranscoderMismatchError unless these transcoders replace `model`'s MLPs: one per layer, hooks that
        exist, widths that match, and (where recorded) the same model identity. all_layers=False accepts a
        set covering only the first layers (partial replacement, e.g. for quality measurements)."""
        n_model = model.cfg.n_layers
        if self.n_layers != n_model and (all_layers or self.n_layers > n_model):
            raise TranscoderMismatchError(
                f"These transcoders cover {self.n_layers} layers but {model.cfg.model_name!r} has {n_model}: a "
                "replacement model needs one per layer; load the set trained for this model.")
        known = model.hook_dict
        for h in self.input_hooks + self.output_hooks:
            if h not in known:
                from mechscope.errors import unknown_name_message

                raise TranscoderMismatchError(unknown_name_message("hook name", h, known) +
                                              f" (the transcoders were made for {self.model_name or 'another model'}).")
        widths = _probe_widths(model, self.input_hooks + self.output_hooks)
        for i in range(self.n_layers):
            for hook, want, what in ((self.input_hooks[i], self.d_in[i], "d_in"),
                                     (self.output_hooks[i], self.d_out[i], "d_out")):
                if widths[hook] != want:
                    raise TranscoderMismatchError(
                        f"{hook} has width {widths[hook]} but layer {i}'s transcoder has {what}={want}: the "
                        "transcoders belong to another model or hook.")
        if self.model_identity:
            from mechscope.models.identity import model_identity, same_model

            diff = same_model(self.model_identity, model_identity(model))
            if diff is not None:
                raise TranscoderMismatchError(
                    f"The transcoders were trained on {self.model_identity.get('name')!r} but this model differs in "
                    f"{diff} ({model.cfg.model_name!r}); use the model they were trained on.")
        return None

    def replacement_interventions(self, *, keep: Callable[[int], bool] | None = None, positions: Any = None) -> list:
        """Interventions replacing every MLP output by the transcoders' prediction, in one forward pass.

        Each input hook records its activation (unchanged); each output hook is set to ts.output(l, ...)
        from the inputs recorded earlier in the SAME pass (so errors compound, as in a replacement model).
        keep(l) -> True leaves layer l's real MLP output (default: replace all). positions: which absolute
        positions to replace (default all; e.g. slice(1, None) leaves a BOS position alone).
        """
        from mechscope.models.interventions import Apply

        seen: dict[int, torch.Tensor] = {}
        acts: dict[int, torch.Tensor] = {}

        def record(layer: int):
            def fn(x: torch.Tensor) -> torch.Tensor:
                seen[layer] = x
                acts[layer] = self.encode(layer, x)
                return x
            return fn

        def replace(layer: int):
            def fn(y: torch.Tensor) -> torch.Tensor:
                a = [acts.get(s) for s in range(layer + 1)]
                return self.output(layer, a, seen.get(layer)).to(y.dtype)
            return fn

        items = []
        for layer in range(self.n_layers):
            items.append(Apply(self.input_hooks[layer], record(layer)))
            if keep is None or not keep(layer):
                items.append(Apply(self.output_hooks[layer], replace(layer), positions=positions))
        return items

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, format: str = "mechscope") -> Path:
        """Write the folder `path`: "mechscope" (transcoders.json + layer_{i}/ native SAE folders, or clt.json +
        clt.safetensors; lossless) or "circuit-tracer" (config.yaml + layer_{i}.safetensors, or W_enc_{i} /
        W_dec_{i}; ReLU / JumpReLU only, see mechscope.sae.io.circuit_tracer)."""
        from mechscope.fileio import atomic_write_json
        from mechscope.validate import writable_dir

        if format not in ("mechscope", "circuit-tracer"):
            raise InputError(f"Unknown transcoder format {format!r}; choose 'mechscope' or 'circuit-tracer'.")
        folder = Path(path)
        writable_dir(folder, flag=None, what="transcoder folder", keep=False)
        if format == "circuit-tracer":
            from mechscope.sae.io import circuit_tracer

            return circuit_tracer.write(self, folder)
        folder.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "clt" if self.cross_layer else "plt",
            "n_layers": self.n_layers, "input_hooks": self.input_hooks, "output_hooks": self.output_hooks,
            "model_name": self.model_name, "model_identity": self.model_identity,
        }
        if self.coders is not None:
            from mechscope.sae.io import save as save_coder

            for i, c in enumerate(self.coders):
                save_coder(c, folder / f"layer_{i}")
        else:
            self.clt.save(folder)  # type: ignore[union-attr]
        atomic_write_json(folder / MANIFEST, manifest)  # last: a folder without it is incomplete
        return folder

    @classmethod
    def load_folder(cls, path: str | os.PathLike, *, device=None, dtype=None) -> TranscoderSet:
        """Read a folder written by save()."""
        from mechscope.sae.io.common import read_json

        folder = Path(path)
        m = read_json(folder / MANIFEST)
        if m.get("format") != FORMAT:
            raise CorruptFileError(f"{folder}/{MANIFEST} is not a mechscope transcoder manifest.")
        if m.get("format_version", 0) > FORMAT_VERSION:
            raise CorruptFileError(f"{folder} was written by a newer mechscope (format {m['format_version']}); "
                                   "upgrade.")
        try:
            n, ins, outs, kind = int(m["n_layers"]), list(m["input_hooks"]), list(m["output_hooks"]), m["kind"]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{folder}/{MANIFEST} misses a field ({e}).") from e
        if kind == "plt":
            from mechscope.sae.io import load as load_coder

            missing = [i for i in range(n) if not (folder / f"layer_{i}").is_dir()]
            if missing:
                raise CorruptFileError(f"{folder} lacks layer_{missing[0]}/ ({len(missing)} of {n} layers missing).")
            coders = [load_coder(folder / f"layer_{i}", device=device, dtype=dtype, format="native")
                      for i in range(n)]
            return cls(coders=coders, input_hooks=ins, output_hooks=outs, model_name=m.get("model_name"),
                       model_identity=m.get("model_identity"))
        if kind == "clt":
            from mechscope.sae.clt import CrossLayerTranscoder

            return cls.from_clt(CrossLayerTranscoder.load(folder, device=device, dtype=dtype))
        raise CorruptFileError(f"{folder}/{MANIFEST} has unknown kind {kind!r} (plt or clt).")

    def __repr__(self) -> str:
        kind = "CLT" if self.cross_layer else ("skip PLT" if self.has_skip else "PLT")
        return (f"TranscoderSet({kind}, {self.n_layers} layers, {self.n_features[0]} features/layer, "
                f"{self.input_hooks[0]} -> {self.output_hooks[0]}, model {self.model_name!r})")


def load_transcoders(path: str | os.PathLike, *, device=None, dtype=None, input_hook: str | None = None,
                     output_hook: str | None = None) -> TranscoderSet:
    """Load a model's transcoders from `path`, detecting the layout: our folder (transcoders.json), or
    circuit-tracer's per-layer set (config.yaml + layer_{i}.safetensors) or cross-layer transcoder
    (W_enc_{i}.safetensors + W_dec_{i}.safetensors). input_hook / output_hook ("blocks.{l}.hook_resid_mid" or
    circuit-tracer's "hook_resid_mid") override the hooks a circuit-tracer folder names (or lacks)."""
    folder = Path(path)
    if not folder.is_dir():
        from mechscope.errors import UnknownFormatError

        raise UnknownFormatError(f"No transcoder folder at {folder}: " +
                                 ("the path does not exist." if not folder.exists() else "it is a file; pass its folder."))
    if is_transcoder_folder(folder):
        if input_hook or output_hook:
            raise InputError(f"{folder} records its hooks; input_hook / output_hook apply to circuit-tracer folders.")
        return TranscoderSet.load_folder(folder, device=device, dtype=dtype)
    from mechscope.sae.io import circuit_tracer

    return circuit_tracer.read(folder, device=device, dtype=dtype, input_hook=input_hook, output_hook=output_hook)


def is_transcoder_folder(folder: Path) -> bool:
    """True for a folder written by TranscoderSet.save."""
    return (folder / MANIFEST).is_file()


def _check_hook_layers(hooks: list[str], what: str) -> None:
    """Layer l's hooks must sit in block l: a list in another order would silently pair wrong layers."""
    from mechscope.models.hooks import layer_of

    for i, h in enumerate(hooks):
        at = layer_of(h)
        if at != i:
            raise InputError(f"Transcoder layer {i}'s {what} hook is {h!r} (block {at}); layer i must read and "
                             f"write block i: pass the coders in layer order.")


@torch.no_grad()
def _probe_widths(model: Any, hooks: list[str]) -> dict[str, int]:
    """Features per token at each hook, from one one-token forward."""
    probe = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    _, cache = model.run_with_cache(probe, names_filter=list(dict.fromkeys(hooks)), return_type=None)
    return {h: math.prod(cache[h].shape[2:]) for h in hooks}


__all__ = ["TranscoderMismatchError", "TranscoderSet", "is_transcoder_folder", "load_transcoders"]
