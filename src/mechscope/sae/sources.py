"""Where a sparse coder's training and evaluation activations come from, and whether a coder fits them.

A BatchSource serves {key: [B, d]} batches in an order that is a function of (seed, step) only,
so a resumed run regenerates exactly the batches it would have seen: in-memory tensors
(TensorSource), an ActivationStore on disk (StoreSource) or a model run on text on the fly
(StreamSource). `open_source` picks one for whatever the caller passed. `check_coder_fits` is the
one "does this coder belong to these activations" rule (hooks, widths, model identity), used by the
trainer, the metrics and feature statistics.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch

from mechscope.errors import HookNameError, InputError, StoreMismatchError, unknown_name_message
from mechscope.sae.coder import SparseCoder
from mechscope.training import EpochOrder

EPOCH_STREAM = "sae:epoch"  # the per-epoch row order of tensor sources (mechscope.training.step_generator)


Batch = dict[str, torch.Tensor]  # key (hook name, or "x"/"y" for tensors) -> [B, d]


class BatchSource:
    """Activations served as {key: [B, d]} batches in an order that is a function of (seed, step).

    keys[i] = (input key, target key or None) for the i-th coder. `batches(start)` yields the
    batches of steps start, start + 1, ... (`one_pass=True`: a single pass over the data, last
    batch possibly smaller, for evaluation).
    """

    keys: list[tuple[str, str | None]]
    widths: dict[str, int]
    model_name: str | None = None
    model_identity: dict[str, Any] | None = None

    def batches(self, start: int, one_pass: bool = False) -> Iterator[Batch]:
        raise NotImplementedError

    def norm_scale(self, key: str) -> float | None:
        """sqrt(d) / E‖x‖ from precomputed statistics, if the source has them."""
        return None

    def data_identity(self) -> dict[str, Any]:
        """JSON identity of the data (not of where it lies): a checkpoint resumes only on the same data."""
        raise NotImplementedError

    def describe(self) -> str:
        """The data in words, for messages ("store S (N tokens of corpus C, seed 0)")."""
        raise NotImplementedError


class TensorSource(BatchSource):
    """In-memory tensors: each epoch is a seeded permutation of the rows (last partial batch dropped)."""

    def __init__(self, tensors: Batch, batch_size: int, seed: int) -> None:
        n = {t.shape[0] for t in tensors.values()}
        if len(n) != 1:
            raise InputError(f"x and y must have the same number of rows, got {sorted(n)}.")
        self.tensors, self.n, self.batch_size, self.seed = tensors, n.pop(), batch_size, seed
        for k, t in tensors.items():
            if t.ndim != 2 or not t.is_floating_point():
                raise InputError(f"{k} must be a float tensor [N, d], got {tuple(t.shape)} {t.dtype}.")
        self.widths = {k: t.shape[1] for k, t in tensors.items()}
        self.keys = [("x", "y" if "y" in tensors else None)]

    def batches(self, start: int, one_pass: bool = False) -> Iterator[Batch]:
        B = self.batch_size
        if one_pass:
            perm = EpochOrder(self.n, B, self.seed, EPOCH_STREAM, drop_last=False).permutation(0)
            for s in range(0, self.n, B):
                yield {k: t[perm[s:s + B].to(t.device)] for k, t in self.tensors.items()}
            return
        order = EpochOrder(self.n, B, self.seed, EPOCH_STREAM, drop_last=True)
        for step in itertools.count(start):
            idx = order.rows(step)
            yield {k: t[idx.to(t.device)] for k, t in self.tensors.items()}

    def data_identity(self) -> dict[str, Any]:
        """Shapes, dtypes and the sha256 of up to 64 evenly spaced rows (cheap, and catches other data)."""
        import hashlib

        idx = torch.linspace(0, self.n - 1, min(64, self.n)).long()
        h = hashlib.sha256()
        for k in sorted(self.tensors):
            rows = self.tensors[k][idx.to(self.tensors[k].device)].detach().cpu().contiguous()  # [<=64, d]
            h.update(rows.view(torch.uint8).numpy().tobytes())  # raw bytes, whatever the dtype
        return {"kind": "TensorSource", "shapes": {k: list(t.shape) for k, t in self.tensors.items()},
                "dtypes": {k: str(t.dtype) for k, t in self.tensors.items()}, "sample_sha256": h.hexdigest()}

    def describe(self) -> str:
        return "tensors " + ", ".join(f"{k} {list(t.shape)}" for k, t in self.tensors.items())


class StoreSource(BatchSource):
    """An ActivationStore: store.batches(seed=data_seed) over as many epochs as needed; resuming at step s
    re-reads and skips the first s batches (the store's order is only defined by iterating it)."""

    def __init__(self, store, hooks: list[str], batch_size: int, seed: int) -> None:
        self.store, self.hooks, self.batch_size, self.seed = store, hooks, batch_size, seed
        shapes = store.hook_shapes
        for h in hooks:
            store._check_hook(h)
        self.widths = {h: math.prod(shapes[h]) for h in hooks}
        self.model_identity = dict(store.manifest.get("model", {})) or None
        self.model_name = (self.model_identity or {}).get("name")

    def batches(self, start: int, one_pass: bool = False) -> Iterator[Batch]:
        it = self.store.batches(self.batch_size, hooks=list(self.hooks), seed=self.seed, dtype=torch.float32,
                                epochs=1 if one_pass else 1 << 40, drop_last=not one_pass)
        for b in itertools.islice(it, start, None):
            yield {h: v.flatten(1) for h, v in b.items()}

    def norm_scale(self, key: str) -> float | None:
        s = self.store.manifest.get("stats", {}).get(key, {})
        return s.get("norm_scale")

    def data_identity(self) -> dict[str, Any]:
        """The store's harvest key (its settings, model and text: what determines its bytes) and row count,
        not its folder: a moved store still resumes, another corpus or seed does not."""
        from mechscope.data.harvest import harvest_key

        return {"kind": "StoreSource", "harvest": harvest_key(self.store.manifest), "tokens": self.store.n_tokens}

    def describe(self) -> str:
        c = self.store.config
        return (f"store {self.store.folder} ({self.store.n_tokens:,} tokens of corpus {c.corpus!r}, split {c.split}, "
                f"seed {c.seed}, context_len {c.context_len})")


STREAM_BUFFER_ROWS = 65536  # rows mixed before serving (a context's rows spread over many batches)
STREAM_BUFFER_BYTES = 2 << 30  # ... but at most this much float32 across all hooks


class StreamSource(BatchSource):
    """Activations computed on the fly by `stream_batches` (no disk); resuming regenerates and skips
    the batches already consumed (same model, text and seed give the same batches)."""

    def __init__(self, model, hooks: list[str], text: Any, batch_size: int, seed: int, n_tokens: int) -> None:
        from mechscope.data.harvest import HarvestConfig, check_hooks
        from mechscope.models.identity import model_identity

        check_hooks(model, hooks)
        self.model, self.hooks, self.batch_size, self.seed = model, hooks, batch_size, seed
        kw: dict[str, Any] = {}
        self.contexts = None
        if isinstance(text, str):
            kw["corpus"] = text
        else:  # PackedContexts
            self.contexts = text
            kw.update(context_len=text.context_len, prepend_bos=text.prepend_bos)
        self.harvest_cfg = HarvestConfig(hooks=list(hooks), n_tokens=n_tokens, seed=seed, **kw)
        probe = torch.zeros(1, 2, dtype=torch.long, device=model.device)
        _, cache = model.run_with_cache(probe, names_filter=list(hooks), return_type=None)
        self.widths = {h: math.prod(cache[h].shape[2:]) for h in hooks}
        # the mixing buffer holds rows of every hook at once (and is permuted into a copy): bound it in bytes,
        # so 60 hooks of a 30-layer model do not need 65k x 60 x d floats twice over
        row_bytes = 4 * sum(self.widths.values())
        self.buffer_rows = int(min(STREAM_BUFFER_ROWS, max(2 * batch_size, STREAM_BUFFER_BYTES // row_bytes)))
        self.model_identity = model_identity(model)
        self.model_name = model.cfg.model_name

    def batches(self, start: int, one_pass: bool = False) -> Iterator[Batch]:
        from mechscope.data.stream import stream_batches

        it = stream_batches(self.model, self.harvest_cfg, self.batch_size, contexts=self.contexts,
                            seed=self.seed, dtype=torch.float32, buffer_tokens=self.buffer_rows)
        for b in itertools.islice(it, start, None):
            b = b if isinstance(b, dict) else {self.hooks[0]: b}
            if not one_pass and b[self.hooks[0]].shape[0] < self.batch_size:
                return  # a partial last batch would change the loss scale
            yield {h: b[h].flatten(1) for h in self.hooks}

    def data_identity(self) -> dict[str, Any]:
        """The text and how it is cut (not n_tokens, which follows the step count)."""
        from mechscope.steps import step_key

        cfg = dataclasses.asdict(self.harvest_cfg)
        cfg.pop("n_tokens")
        text = self.contexts.describe() if self.contexts is not None else cfg["corpus"]
        return {"kind": "StreamSource", "settings": step_key(cfg, {"text": text})}

    def describe(self) -> str:
        c = self.harvest_cfg
        text = f"corpus {c.corpus!r}" if self.contexts is None else "the given contexts"
        return f"activations streamed from {text} (seed {c.seed}, context_len {c.context_len})"


def open_source(source: Any, *, batch_size: int, seed: int, n_tokens: int,
                keys: list[tuple[str | None, str | None]]) -> BatchSource:
    """Wrap `source` (tensor [N, d] | (x, y) tensors | ActivationStore | (model, hook, text)) and resolve
    each coder's (hook, target_hook) into source keys. target None (or == hook): an autoencoder."""
    from mechscope.data.store import ActivationStore

    if isinstance(source, torch.Tensor) or (isinstance(source, tuple | list) and len(source) == 2
                                            and all(isinstance(t, torch.Tensor) for t in source)):
        tensors = {"x": source} if isinstance(source, torch.Tensor) else {"x": source[0], "y": source[1]}
        src: BatchSource = TensorSource(tensors, batch_size, seed)
        src.keys = [("x", "y" if "y" in tensors else None) for _ in keys]
        return src
    if isinstance(source, ActivationStore):
        resolved = [_resolve_hooks(h, t, source.hooks, "this store") for h, t in keys]
        src = StoreSource(source, _unique(resolved), batch_size, seed)
    elif isinstance(source, tuple | list) and len(source) == 3 and hasattr(source[0], "run_with_cache"):
        model, hook, text = source
        resolved = [(h or hook, t) for h, t in keys]
        resolved = [(h, None if t in (None, h) else t) for h, t in resolved]  # type: ignore[misc]
        src = StreamSource(model, _unique(resolved), text, batch_size, seed, n_tokens)
    else:
        raise InputError("source must be a tensor [N, d], an (x, y) pair of tensors, an ActivationStore, or "
                         f"(model, hook, text) to stream from a model; got {type(source).__name__}.")
    src.keys = resolved  # type: ignore[assignment]
    return src


def _resolve_hooks(hook: str | None, target: str | None, available: list[str],
                   where: str) -> tuple[str, str | None]:
    if hook is None:
        if len(available) != 1:
            raise InputError(f"{where} holds several hooks ({', '.join(available)}): pass hook=.")
        hook = available[0]
    return hook, None if target in (None, hook) else target


def _unique(keys: list[tuple[str, str | None]]) -> list[str]:
    return list(dict.fromkeys(k for pair in keys for k in pair if k is not None))


# ---------------------------------------------------------------------------- does a coder fit


def check_coder_fits(model: Any, coder: SparseCoder, *, hook: str | None = None,
                     target_hook: str | None = None) -> tuple[str, str | None]:
    """Typed errors unless `coder` reads (and, for a transcoder, writes) activations of `model`.

    model: a HookedTransformer, or a BatchSource (its keys, widths and model identity). hook /
    target_hook default to the coder's hook_in / hook_out (no target for an autoencoder). Checks
    that the hooks exist (HookNameError), that their widths are the coder's d_in / output width
    (InputError) and, where both sides record one, that the model identity matches
    (StoreMismatchError). Returns (input hook, target hook or None).
    """
    c = coder.cfg
    hook_in = hook or c.hook_in
    hook_out = target_hook or (c.hook_out if c.is_transcoder else None)
    hook_out = None if hook_out == hook_in and not c.is_transcoder else hook_out
    if hook_in is None:
        raise InputError("The coder records no hook_in (cfg.hook_in is None): pass its input hook, e.g. "
                         "hook='blocks.6.hook_resid_post', or set coder.cfg.hook_in.")
    hooks = [h for h in (hook_in, hook_out) if h is not None]
    if isinstance(model, BatchSource):
        known: Any = model.widths
        have_id = model.model_identity
    else:
        known = model.hook_dict
        have_id = None
    for h in hooks:
        if h not in known:
            raise HookNameError(unknown_name_message("hook name", h, known) +
                                f" (the coder was trained on {c.model_name or 'another model'}).")
    if isinstance(model, BatchSource):
        widths = {h: model.widths[h] for h in hooks}
    else:
        widths = _probe_widths(model, hooks)
        if c.model_identity:
            from mechscope.models.identity import model_identity

            have_id = model_identity(model)
    for key, want, what in ((hook_in, c.d_in, "d_in"), (hook_out, c.out_dim, "d_out")):
        if key is not None and widths[key] != want:
            raise InputError(f"{key} has width {widths[key]} (features per token) but the coder has {what}={want}: "
                             "the coder belongs to another model or hook.")
    want_id = c.model_identity
    if want_id and have_id:
        for k in ("config_hash", "weights_fingerprint"):
            if k in want_id and k in have_id and want_id[k] != have_id[k]:
                raise StoreMismatchError(
                    f"The coder was trained on {want_id.get('name')!r} ({k} {want_id[k]}), but these activations "
                    f"come from {have_id.get('name')!r} ({k} {have_id[k]}); use the model it was trained on.")
    return hook_in, hook_out


_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "hook_tokens")  # computed before block 0


@torch.no_grad()
def _probe_widths(model: Any, hooks: list[str]) -> dict[str, int]:
    """Features per token at each hook, from a one-token forward stopped after the last layer needed."""
    from mechscope.models.hooks import layer_of

    layers = [-1 if h in _EMBED_HOOKS else layer_of(h) for h in hooks]
    last = None if any(v is None for v in layers) else max(layers)  # type: ignore[type-var]
    stop = last + 1 if last is not None and last + 1 < model.cfg.n_layers else None
    probe = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    _, cache = model.run_with_cache(probe, names_filter=list(hooks), stop_at_layer=stop, return_type=None)
    return {h: math.prod(cache[h].shape[2:]) for h in hooks}


__all__ = ["Batch", "BatchSource", "TensorSource", "StoreSource", "StreamSource", "open_source",
           "check_coder_fits", "EPOCH_STREAM"]
