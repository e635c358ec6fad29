"""ActivationCache: the activations of one forward pass, by hook name, with TransformerLens helpers.

A read-only mapping hook name -> tensor. Besides full names it takes TransformerLens short
names: cache["resid_post", 3], cache["pattern", 0], cache["q", 1, "attn"], cache["embed"],
cache["scale", 2, "ln1"], cache["scale"] (ln_final), negative layers. Gradients cached with
incl_bwd=True are "<name>_grad" (cache["resid_post_grad", 3]).
Shapes: n stack entries, B batch (absent after remove_batch_dim), T positions, H heads, D d_model.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, HookNameError, InputError, unknown_name_message
from mechscope.models.hooks import layer_of

Index = int | slice | tuple | list | torch.Tensor | None  # pos_slice / batch_slice (TL's Slice input)
_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "result", "pattern", "attn_scores"}
_MLP = {"pre", "post", "pre_linear"}
_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
          "mlp_pre": "pre", "mlp_post": "post"}
_FORMAT = "mechscope.ActivationCache"


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's get_act_name: ("resid_post", 3) -> "blocks.3.hook_resid_post"."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    grad = name.endswith("_grad")
    base = _ALIAS.get(name.removesuffix("_grad"), name.removesuffix("_grad"))
    layer_type = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": ""}.get(layer_type, layer_type)
    if base in _ATTN:
        layer_type = "attn"
    elif base in _MLP:
        layer_type = "mlp"
    full = (f"blocks.{layer}." if layer is not None else "") + (f"{layer_type}." if layer_type else "")
    full += f"hook_{base}" + ("_grad" if grad else "")
    if base in ("scale", "normalized") and layer is None:
        full = "ln_final." + full
    return full


def _slice(t: torch.Tensor, s: Index, dim: int) -> torch.Tensor:
    """TL's Slice.apply: None keeps all, an int drops the dim, a tuple is slice(*s), lists/tensors index."""
    if s is None:
        return t
    idx: list[Any] = [slice(None)] * t.dim()
    idx[dim] = slice(*s) if isinstance(s, tuple) else torch.as_tensor(s) if isinstance(s, list) else s
    return t[tuple(idx)]


class LazyTensor:
    """A cache entry computed on first access (per-head results from the cached z and W_O), so
    caching "everything" does not pay for [B, T, H, D] tensors nobody reads."""

    def __init__(self, compute: Callable[[], torch.Tensor]) -> None:
        self.compute = compute


class LazyStore(dict):
    """name -> tensor dict whose LazyTensor values are computed, and kept, when first read."""

    def __getitem__(self, key: str) -> torch.Tensor:
        value = dict.__getitem__(self, key)
        if isinstance(value, LazyTensor):
            value = value.compute()
            dict.__setitem__(self, key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> list[torch.Tensor]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, torch.Tensor]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]


class ActivationCache(Mapping):
    """Read-only mapping of cached activations. `store` is kept by reference so gradients saved by
    a later backward pass (run_with_cache(incl_bwd=True)) appear in the cache."""

    def __init__(self, store: dict[str, torch.Tensor], model: Any, has_batch_dim: bool = True,
                 meta: dict[str, str] | None = None) -> None:
        self._store = store if isinstance(store, dict) else dict(store)
        self.model = model  # keeps the model alive; set to None if you only need the tensors
        self.has_batch_dim = has_batch_dim
        self._meta = dict(meta or {})
        if model is not None:
            c = model.cfg
            self._meta.update(model_name=str(c.model_name), n_layers=str(c.n_layers),
                              normalization=c.normalization, n_heads=str(c.n_heads))

    # ------------------------------------------------------------------ mapping
    def _resolve(self, key: str | tuple) -> str:
        if isinstance(key, str):
            return key if key in self._store else act_name(key)
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
            raise HookNameError(f"Cache keys are names or (name, layer[, type]) tuples, got {key!r}.")
        layer = key[1] if len(key) > 1 else None
        if layer is not None and layer < 0:
            layer += self.n_layers
        return act_name(key[0], layer, *key[2:3])

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = self._resolve(key)
        if name in self._store:
            return self._store[name]
        if name.removesuffix("_grad") in getattr(self.model, "hook_dict", {}):
            close = difflib.get_close_matches(name, self._store, n=5, cutoff=0.5)
            raise HookNameError(f"{name!r} is a hook point but was not cached: include it in run_with_cache's "
                                f"names_filter (and incl_bwd=True for _grad)."
                                + (f" Cached names close to it: {', '.join(close)}." if close else ""))
        raise HookNameError(unknown_name_message("cache name", name, self._store))

    def __contains__(self, key: object) -> bool:
        try:
            return self._resolve(key) in self._store  # type: ignore[arg-type]
        except (HookNameError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    __eq__ = object.__eq__  # Mapping's __eq__ would compare tensors elementwise
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        b = "with" if self.has_batch_dim else "without"
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self._store.items())[:4])
        more = f", ... ({len(self) - 4} more)" if len(self) > 4 else ""
        return f"ActivationCache({self._meta.get('model_name', '?')}, {len(self)} tensors {b} batch dim: {shapes}{more})"

    # ------------------------------------------------------------------ helpers
    @property
    def n_layers(self) -> int:
        if "n_layers" in self._meta:
            return int(self._meta["n_layers"])
        layers = [layer for k in self._store if (layer := layer_of(k)) is not None]
        return max(layers) + 1 if layers else 0

    def _need_model(self, what: str) -> Any:
        if self.model is None:
            raise InputError(f"{what} needs the model's weights; pass model= to ActivationCache.load.")
        return self.model

    def _layer(self, layer: int | None) -> int:
        return self.n_layers if layer is None or layer == -1 else (layer if layer >= 0 else self.n_layers + layer)

    def stack_activation(self, name: str, layer: int = -1, sublayer_type: str | None = None) -> torch.Tensor:
        """[L, ...]: `name` (short, e.g. "resid_post" or "scale" with sublayer_type "ln1") for layers < layer."""
        return torch.stack([self[(name, la, sublayer_type)] for la in range(self._layer(layer))])

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Index = None, mlp_input: bool = False, return_labels: bool = False):
        """[n, B, T, D]: resid_pre of layers < layer+1 (and resid_mid with incl_mid); layer None/-1 also
        appends the final resid_post ("final_post") -- the logit lens stack."""
        layer, n = self._layer(layer), self.n_layers
        parts, labels = [], []
        for la in range(layer + 1):
            if la == n:
                parts.append(self[("resid_post", n - 1)])
                labels.append("final_post")
                continue
            parts.append(self[("resid_pre", la)])
            labels.append(f"{la}_pre")
            if (incl_mid and la < layer) or (mlp_input and la == layer):
                parts.append(self[("resid_mid", la)])
                labels.append(f"{la}_mid")
        stack = torch.stack([_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: Index = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """[n, B, T, D]: embed, pos_embed and every attn_out/mlp_out before `layer`; they sum to
        resid_pre of `layer` (resid_post of the last layer when layer is None/-1/n_layers)."""
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}.")
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None and (cfg.post_layernorm or cfg.embed_norm):
            raise InputError("decompose_resid needs a pre-norm model: here norms sit on the residual itself.")
        layer = self._layer(layer)
        parts, labels = [], []
        if incl_embeds:
            for name in ("embed", "pos_embed"):
                if f"hook_{name}" in self._store:
                    parts.append(self[f"hook_{name}"])
                    labels.append(name)
        kinds = [k for k in ("attn", "mlp") if mode in ("all", k) and not (k == "mlp" and getattr(cfg, "attn_only", False))]
        for la in range(layer):
            for k in kinds:
                parts.append(self[(f"{k}_out", la)])
                labels.append(f"{la}_{k}_out")
        if mlp_input and "attn" in kinds and not (cfg is not None and cfg.parallel_attn_mlp):
            parts.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Index = None, apply_ln: bool = False):
        """[L*H, B, T, D]: each head's write to the residual, z[h] @ W_O[h] (no b_O), labels "L{l}H{h}".
        Uses cached hook_result if present, else the cached hook_z and the model's W_O."""
        layer = self._layer(layer)
        parts, labels = [], []
        for la in range(layer):
            if f"blocks.{la}.attn.hook_result" in self._store:
                res = _slice(self[("result", la)], pos_slice, -3)  # [B, T, H, D]
            else:
                w_o = self._need_model("stack_head_results without hook_result").blocks[la].attn.W_O  # [H, E, D]
                z = _slice(self[("z", la)], pos_slice, -3)  # [B, T, H, E]
                res = torch.einsum("...he,hed->...hd", z, w_o.detach().to(z.device, z.dtype))
            parts.append(res.movedim(-2, 0))  # [H, B, T, D]
            labels += [f"L{la}H{h}" for h in range(res.shape[-2])]
        if not parts:
            raise InputError("stack_head_results with layer=0 has no heads to stack.")
        stack = torch.cat(parts)
        if incl_remainder:
            rest = _slice(self[("resid_post", layer - 1)], pos_slice, -2) - stack.sum(0)
            stack, labels = torch.cat([stack, rest[None]]), labels + ["remainder"]
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: Index = None, batch_slice: Index = None,
                          has_batch_dim: bool = True) -> torch.Tensor:
        """[n, B, T, D] -> centred (LayerNorm only) and divided by the cached hook_scale of the norm
        reading the residual at `layer` (ln_final for None/-1/n_layers, else blocks.{layer}.ln1, or
        ln2 with mlp_input). Like TransformerLens, the norm's weight and bias are NOT applied: exact
        after fold_ln, otherwise multiply by w and add b yourself. The stack must already be
        pos-sliced; pos_slice and batch_slice select the matching scales."""
        layer = self._layer(layer)
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None and layer == self.n_layers and not cfg.final_norm:
            return residual_stack  # no final norm: nothing to apply
        if has_batch_dim:
            residual_stack = _slice(residual_stack, batch_slice, 1)
        if self._meta.get("normalization", "LN") == "LN":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        if layer == self.n_layers:
            name = "ln_final.hook_scale"
        else:
            name = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        scale = _slice(self[name], pos_slice, -2)  # [B, T, 1]
        if self.has_batch_dim:
            scale = _slice(scale, batch_slice, 0)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: torch.Tensor, tokens: int | str | torch.Tensor,
                    incorrect_tokens: int | str | torch.Tensor | None = None, pos_slice: Index = None,
                    batch_slice: Index = None, has_batch_dim: bool = True) -> torch.Tensor:
        """[n, B, T]: apply_ln_to_stack(stack) . (W_U[:, tokens] - W_U[:, incorrect_tokens]).

        As in TransformerLens the final norm's scaling is applied here, so pass the raw stack (the
        sum over a full decomposition is the logit (difference) minus b_U on an fold_ln model).
        tokens: an id, a single-token string, [B] (one per example), [T] or [B, T]."""
        model = self._need_model("logit_attrs")
        w_u = model.W_U.detach()  # [D, V]
        right = self._tokens(tokens)
        dirs = w_u[:, right].movedim(0, -1)  # [..., D]
        if incorrect_tokens is not None:
            wrong = self._tokens(incorrect_tokens)
            if wrong.shape != right.shape:
                raise InputError(f"tokens and incorrect_tokens differ in shape: "
                                 f"{tuple(right.shape)} vs {tuple(wrong.shape)}.")
            dirs = dirs - w_u[:, wrong].movedim(0, -1)
        stack = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                       has_batch_dim=has_batch_dim)
        if has_batch_dim and stack.dim() == 4 and dirs.dim() == 2 and dirs.shape[0] == stack.shape[1]:
            dirs = dirs[:, None]  # one token per example: broadcast over positions
        return (stack * dirs.to(stack.device, stack.dtype)).sum(-1)

    def _tokens(self, tokens: int | str | torch.Tensor) -> torch.Tensor:
        if isinstance(tokens, str):
            ids = self.model.require_tokenizer()(tokens, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise InputError(f"{tokens!r} is {len(ids)} tokens; logit_attrs needs single tokens.")
            tokens = ids[0]
        return torch.as_tensor(tokens, dtype=torch.long, device=self.model.W_U.device)

    # ------------------------------------------------------------------ copies
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ActivationCache:
        """A new cache on `device`; dtype converts floating tensors only."""
        out = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
               for k, v in self._store.items()}
        return ActivationCache(out, self.model, self.has_batch_dim, self._meta)

    def remove_batch_dim(self) -> ActivationCache:
        """A new cache without the batch dim (batch size must be 1)."""
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self._store.values() if v.dim() > 0}
        if sizes - {1}:
            raise InputError(f"remove_batch_dim needs batch size 1, found leading sizes {sorted(sizes)}.")
        return ActivationCache({k: v[0] for k, v in self._store.items()}, self.model, False, self._meta)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (temp file in the same folder, then os.replace)."""
        path = Path(path)
        from safetensors.torch import save_file

        meta = {**self._meta, "format": _FORMAT, "has_batch_dim": str(self.has_batch_dim)}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self._store.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> ActivationCache:
        """Read a cache written by save (safetensors only; nothing is unpickled)."""
        from safetensors import safe_open

        if not Path(path).is_file():
            raise InputError(f"No cache file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                store = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for malformed headers/data
            raise CorruptFileError(f"{path} is not a readable safetensors activation cache: {e}") from e
        if meta.get("format") != _FORMAT or meta.get("has_batch_dim") not in ("True", "False"):
            raise CorruptFileError(f"{path} is a safetensors file but not a saved ActivationCache (metadata {meta}).")
        has_batch = meta.pop("has_batch_dim") == "True"
        meta.pop("format")
        return cls(store, model, has_batch_dim=has_batch, meta=meta)
