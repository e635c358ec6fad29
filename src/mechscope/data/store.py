"""ActivationStore: open a harvested folder, check it against a model, serve shuffled mini-batches.

Shuffling works like a trainer wants it (see `batches`): chunks of rows from all shards in a
seeded random order, mixed row by row in a buffer, the next buffer read in the background.
Rows of one context end up spread over many batches, and the same seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from mechscope.data.harvest import (
    STATS,
    HarvestConfig,
    check_model,
    check_shard,
    harvest,
    load_shard,
    read_manifest,
)
from mechscope.errors import CorruptFileError, HookNameError, InputError, unknown_name_message

TOKEN_KEYS = ("tokens", "context_ids", "positions")
Batch = dict[str, torch.Tensor]  # hook name -> [B, *shape]; optionally tokens/context_ids/positions -> [B]


class ActivationStore:
    """A folder of activation shards written by `harvest` (see harvest.py for the layout).

    Each shard is checked against the sha256 its manifest records the first time this object reads
    it (bit-rot is refused, not served); the check reads the file once, which also warms the page
    cache for the memory-mapped reads that follow, and runs in the background reader thread while
    batches are being served.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.config = HarvestConfig(**manifest["config"])
        self._checked: set[str] = set()  # shard files whose checksum matched

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, folder: str | Path, model=None, *, allow_incomplete: bool = False) -> ActivationStore:
        """Open a store; with `model`, refuse a store harvested from another model (StoreMismatchError)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if not manifest["complete"] and not allow_incomplete:
            raise CorruptFileError(
                f"The harvest in {folder} is unfinished ({manifest['tokens']} of {manifest['config']['n_tokens']} "
                "tokens): rerun the same harvest command to resume it, or open with allow_incomplete=True."
            )
        if manifest["shards"] and not (folder / STATS).exists():
            raise CorruptFileError(f"{folder} lacks {STATS} (the per-hook statistics): the store is damaged; "
                                   "re-harvest it (the same command with --overwrite, or overwrite=True).")
        if model is not None:
            check_model(manifest, model, str(folder))
        return cls(folder, manifest)

    @classmethod
    def harvest(cls, model, hooks: str | list[str], n_tokens: int, out: str | Path, *, contexts=None,
                progress: bool = True, overwrite: bool = False, **config) -> ActivationStore:
        """Harvest (or resume, or reuse a finished) store in `out` and open it. config: HarvestConfig fields."""
        cfg = HarvestConfig(hooks=hooks, n_tokens=n_tokens, **config)  # type: ignore[arg-type]
        harvest(model, cfg, out, contexts=contexts, progress=progress, overwrite=overwrite)
        return cls.open(out, model)

    # ------------------------------------------------------------------ what it holds
    @property
    def hooks(self) -> list[str]:
        return list(self.config.hooks)

    @property
    def hook_shapes(self) -> dict[str, tuple[int, ...]]:
        return {h: tuple(s) for h, s in self.manifest["hook_shapes"].items()}

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    def stats(self, hook: str) -> dict[str, Any]:
        """Summary scalars (mean_norm, norm_scale, total_variance, ...) plus "mean" and "var" [*shape]."""
        from safetensors import SafetensorError, safe_open

        self._check_hook(hook)
        out: dict[str, Any] = dict(self.manifest["stats"].get(hook, {}))
        try:
            with safe_open(str(self.folder / STATS), framework="pt") as f:
                out["mean"], out["var"] = f.get_tensor(f"{hook}.mean"), f.get_tensor(f"{hook}.var")
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CorruptFileError(f"Could not read the statistics of {hook} in {self.folder / STATS} ({e}): the "
                                   "store is damaged; re-harvest it (the same command with --overwrite).") from e
        return out

    def __repr__(self) -> str:
        return (f"ActivationStore({self.folder}: {self.n_tokens:,} tokens of {', '.join(self.hooks)} from "
                f"{self.manifest['model']['name']}, {self.config.dtype})")

    def _check_hook(self, hook: str) -> None:
        if hook not in self.config.hooks:
            raise HookNameError(unknown_name_message("hook in this store", hook, self.config.hooks))

    def _keys(self, hooks: str | list[str] | None, with_tokens: bool) -> list[str]:
        names = self.hooks if hooks is None else [hooks] if isinstance(hooks, str) else list(hooks)
        for h in names:
            self._check_hook(h)
        if with_tokens:
            if not self.config.keep_tokens:
                raise InputError(f"{self.folder} was harvested without keep_tokens; token ids are not stored.")
            names += list(TOKEN_KEYS)
        return names

    # ------------------------------------------------------------------ reading
    def verify(self) -> None:
        """Check every shard (size, sha256, format) now: CorruptFileError on the first bad one."""
        for entry in self.manifest["shards"]:
            self._check(entry)
            load_shard(self.folder, entry)

    def _check(self, entry: dict[str, Any]) -> None:
        """Size always; the recorded sha256 once per shard and object (thread-safe enough: worst case twice)."""
        check_shard(self.folder, entry, checksum=entry["file"] not in self._checked)
        self._checked.add(entry["file"])

    def load(self, hook: str, max_rows: int | None = None) -> torch.Tensor:
        """All rows of one hook, in harvest order: [N, *shape] (for small stores and analyses)."""
        self._check_hook(hook)
        parts, n = [], 0
        for entry in self.manifest["shards"]:
            if max_rows is not None and n >= max_rows:
                break
            self._check(entry)
            t = load_shard(self.folder, entry, [hook])[hook]
            parts.append(t)
            n += t.shape[0]
        return torch.cat(parts)[:max_rows]

    def contexts(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(global context id, token ids [T]) of every harvested context, in order."""
        if not self.config.keep_tokens:
            raise InputError(f"{self.folder} was harvested without keep_tokens; contexts are not stored.")
        for entry in self.manifest["shards"]:
            self._check(entry)
            ctx = load_shard(self.folder, entry, ["contexts"])["contexts"]
            for i, row in enumerate(ctx):
                yield entry["contexts"][0] + i, row.long()

    def batches(self, batch_size: int, *, hooks: str | list[str] | None = None, shuffle: bool = True,
                seed: int = 0, epochs: int = 1, buffer_rows: int = 65536, chunk_rows: int = 128,
                drop_last: bool = False, with_tokens: bool = False, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Iterator[torch.Tensor | Batch]:
        """Mini-batches of rows. hooks=str gives plain [B, *shape] tensors; a list (or None: all) gives
        dicts {hook: [B, *shape]} (+ tokens/context_ids/positions [B] with with_tokens).

        Shuffling: the store is cut into chunks of `chunk_rows` consecutive rows, all chunks are
        permuted (seed + epoch), and `buffer_rows` rows' worth of chunks at a time are read
        (memory-mapped slices, the next buffer read in a background thread), permuted row by row
        and cut into batches. Serving order thus has no relation to corpus order at any scale
        larger than a buffer, and a batch mixes rows of up to buffer_rows / chunk_rows chunks.
        """
        if batch_size <= 0 or buffer_rows <= 0 or chunk_rows <= 0:
            raise InputError("batch_size, buffer_rows and chunk_rows must be positive.")
        if drop_last and batch_size > self.n_tokens:  # every epoch would serve nothing: never loop on it
            raise InputError(f"{self.folder} holds {self.n_tokens:,} rows, fewer than one batch of {batch_size:,}: "
                             "lower the batch size (--batch-size) or harvest more tokens (--tokens).")
        keys = self._keys(hooks, with_tokens)
        single = isinstance(hooks, str) and not with_tokens
        for epoch in range(epochs):
            chunk = chunk_rows if shuffle else 1 << 62
            for batch in self._epoch(keys, batch_size, shuffle, seed + epoch, buffer_rows, chunk, drop_last):
                if device is not None or dtype is not None:
                    batch = {k: v.to(device=device, dtype=dtype if k not in TOKEN_KEYS else None)
                             for k, v in batch.items()}
                yield batch[keys[0]] if single else batch

    def _epoch(self, keys: list[str], batch_size: int, shuffle: bool, seed: int, buffer_rows: int,
               chunk_rows: int, drop_last: bool) -> Iterator[Batch]:
        from safetensors import safe_open

        entries = self.manifest["shards"]
        for e in entries:  # size check up front: a truncated shard fails before any batch is served
            check_shard(self.folder, e, checksum=False)
        chunks = [(i, s, min(s + chunk_rows, e["rows"])) for i, e in enumerate(entries)
                  for s in range(0, e["rows"], chunk_rows)]
        g = torch.Generator().manual_seed(seed)
        if shuffle:
            chunks = [chunks[j] for j in torch.randperm(len(chunks), generator=g).tolist()]
        groups, cur, n = [], [], 0
        for c in chunks:
            cur.append(c)
            n += c[2] - c[1]
            if n >= buffer_rows:
                groups.append(cur)
                cur, n = [], 0
        if cur:
            groups.append(cur)
        handles: dict[int, Any] = {}

        def read(group: list[tuple[int, int, int]]) -> Batch:
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
            for i, s, e in group:
                if i not in handles:
                    self._check(entries[i])  # the sha256, once: in this background thread
                    handles[i] = safe_open(str(self.folder / entries[i]["file"]), framework="pt")
                for k in keys:
                    parts[k].append(handles[i].get_slice(k)[s:e])
            return {k: torch.cat(v) for k, v in parts.items()}

        carry: Batch | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="mechscope-shard-reader") as pool:
            pending = pool.submit(read, groups[0]) if groups else None
            for gi in range(len(groups)):
                rows = pending.result()  # type: ignore[union-attr]
                pending = pool.submit(read, groups[gi + 1]) if gi + 1 < len(groups) else None
                if carry is not None:
                    rows = {k: torch.cat([carry[k], rows[k]]) for k in keys}
                n = rows[keys[0]].shape[0]
                if shuffle:
                    perm = torch.randperm(n, generator=g)
                    rows = {k: v[perm] for k, v in rows.items()}
                full = n - n % batch_size
                for s in range(0, full, batch_size):
                    yield {k: v[s:s + batch_size] for k, v in rows.items()}
                carry = {k: v[full:] for k, v in rows.items()} if full < n else None
        if carry is not None and not drop_last:
            yield carry
