"""Activations served straight from the model, no disk: harvest into a mixing buffer, serve shuffled.

For runs where writing a store is not worth it (one SAE, activations cheaper to recompute than
to read). The buffer holds `buffer_tokens` rows; each refill runs forward passes, then the
whole buffer is permuted and its first half is served, so a context's rows spread over several
refills' worth of batches. Deterministic under `seed` (same model, same contexts).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mechscope.data.harvest import HarvestConfig, check_hooks, harvest_rows, token_rows
from mechscope.data.stats import RunningStats

Batch = dict[str, torch.Tensor]


def stream_batches(model, cfg: HarvestConfig, batch_size: int, *, contexts=None, buffer_tokens: int = 65536,
                   seed: int = 0, with_tokens: bool = False, device=None,
                   dtype: torch.dtype | None = None) -> Iterator[torch.Tensor | Batch]:
    """Shuffled mini-batches of cfg.hooks activations over cfg.n_tokens rows (a tensor if one hook)."""
    from mechscope.data.packing import contexts as make_contexts

    check_hooks(model, cfg.hooks)
    if contexts is None:
        contexts = make_contexts(cfg.corpus, model.require_tokenizer(), cfg.context_len, seed=cfg.seed,
                                 split=cfg.split, prepend_bos=cfg.prepend_bos)
    buffer_tokens = max(buffer_tokens, 2 * batch_size)
    keys = list(cfg.hooks) + (["tokens", "context_ids", "positions"] if with_tokens else [])
    single = len(cfg.hooks) == 1 and not with_tokens
    g = torch.Generator().manual_seed(seed)
    batches = contexts.batches(cfg.batch_size)
    buf: Batch | None = None
    produced, ctx_done, exhausted = 0, 0, False

    def emit(rows: Batch) -> Batch | torch.Tensor:
        rows = {k: v.to(device=device, dtype=dtype if k in cfg.hooks else None) for k, v in rows.items()}
        return rows[keys[0]] if single else rows

    while True:
        n = 0 if buf is None else buf[keys[0]].shape[0]
        fresh: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        while n < buffer_tokens and produced < cfg.n_tokens and not exhausted:
            tokens = next(batches, None)
            if tokens is None:
                exhausted = True
                break
            acts = harvest_rows(model, tokens, cfg)
            if with_tokens:
                acts |= token_rows(cfg, tokens, ctx_done)
            take = min(cfg.n_tokens - produced, tokens.shape[0] * cfg.rows_per_context)
            for k in keys:
                fresh[k].append(acts[k][:take])
            ctx_done += tokens.shape[0]
            produced += take
            n += take
        if fresh[keys[0]]:
            new = {k: torch.cat(v) for k, v in fresh.items()}
            buf = new if buf is None else {k: torch.cat([buf[k], new[k]]) for k in keys}
        if buf is None or buf[keys[0]].shape[0] == 0:
            return
        n = buf[keys[0]].shape[0]
        perm = torch.randperm(n, generator=g)
        buf = {k: v[perm] for k, v in buf.items()}
        done = produced >= cfg.n_tokens or exhausted
        serve = n if done else max(batch_size, (n // 2) // batch_size * batch_size)
        serve -= serve % batch_size if not done else 0
        for s in range(0, serve, batch_size):
            yield emit({k: v[s:s + batch_size] for k, v in buf.items()})
        buf = {k: v[serve:] for k, v in buf.items()}
        if done:
            return


def activation_stats(model, cfg: HarvestConfig, *, contexts=None) -> dict[str, RunningStats]:
    """Mean / variance / norm statistics of cfg.hooks over cfg.n_tokens tokens, no disk (one pass).

    The same numbers a harvest caches in its manifest; for mean ablation, probes and SAE input
    scaling when no store exists.
    """
    stats: dict[str, RunningStats] = {}
    for batch in stream_batches(model, cfg, 4096, contexts=contexts, buffer_tokens=4096):
        batch = batch if isinstance(batch, dict) else {cfg.hooks[0]: batch}
        for h in cfg.hooks:
            stats.setdefault(h, RunningStats(tuple(batch[h].shape[1:]))).update(batch[h])
    return stats
