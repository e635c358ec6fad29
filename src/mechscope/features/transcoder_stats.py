"""Feature statistics of chosen features of a transcoder set (PLT, skip or CLT), in one model pass per batch.

    stats = transcoder_feature_stats(model, ts, {3: [17, 402], 7: [5]}, "sotu", tokens=8192)
    stats[3].top_values, stats[3].top_tokens, stats[3].density ...      # {layer: FeatureStats}

Why not `feature_stats` once per layer: an attribution graph holds a few features spread over many layers, and
one pass per layer would run the model once per layer over the same text. Here each batch runs the model once
(stopped after the deepest layer needed), caching only those layers' input hooks; each layer's features are
encoded by the set (`ts.encode(layer, x)`: a CLT layer's encoder reads that layer's input hook) and fed to the
same bounded accumulators as `feature_stats` (running top-k with ties to the earliest token, density, max,
histogram), so the results read exactly like feature_stats' (without logit effects: feature_details computes
those from the transcoders' decoders). BOS positions are excluded as in feature_stats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mechscope.data.packing import PackedContexts, contexts
from mechscope.errors import EmptyCorpusError, InputError
from mechscope.features.stats import FeatureStats, _layer_of, _State

__all__ = ["transcoder_feature_stats"]


def _features_by_layer(transcoders: Any, features: Mapping[int, Any]) -> dict[int, torch.Tensor]:
    """{layer: [F] long latent indices} (sorted, unique), refusing layers or indices out of range."""
    if not isinstance(features, Mapping):
        raise InputError(f"features maps layer -> latent indices, e.g. {{3: [17, 402]}}; got "
                         f"{type(features).__name__}.")
    n = transcoders.n_features
    out = {}
    for layer, feats in sorted(features.items()):
        if not isinstance(layer, int) or not 0 <= layer < len(n):
            raise InputError(f"Layer {layer!r} is not one of the transcoders' layers 0..{len(n) - 1}.")
        f = torch.as_tensor(feats, dtype=torch.long).flatten().unique()  # [F] sorted
        if f.numel() == 0:
            continue
        if f.min() < 0 or f.max() >= n[layer]:
            raise InputError(f"Layer {layer}'s feature indices must lie in [0, {n[layer]}); got "
                             f"{f.min().item()}..{f.max().item()}.")
        out[layer] = f
    return out


def transcoder_feature_stats(model: Any, transcoders: Any, features: Mapping[int, Any], text: Any = "sotu", *,
                             tokens: int = 8192, context_len: int = 64, batch_size: int = 8, top_k: int = 5,
                             hist_bins: int = 32, seed: int = 0, exclude_bos: bool = True,
                             progress: bool = True) -> dict[int, FeatureStats]:
    """{layer: FeatureStats} of `features` ({layer: latent indices}) of a TranscoderSet over about `tokens`
    tokens of `text` (a corpus name, path, list of str or PackedContexts; whole contexts of `context_len`,
    rounded up). Each FeatureStats' rows follow its sorted latent indices (`.features`); top_k: contexts kept
    per feature. One model forward per batch of `batch_size` contexts, for every layer at once."""
    for name, v, lo in (("tokens", tokens, 1), ("context_len", context_len, 2), ("batch_size", batch_size, 1),
                        ("top_k", top_k, 1), ("hist_bins", hist_bins, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}.")
    if context_len > model.cfg.n_ctx:
        raise InputError(f"context_len {context_len} exceeds the model's n_ctx {model.cfg.n_ctx}.")
    feats = _features_by_layer(transcoders, features)
    if not feats:
        return {}
    hooks = {layer: transcoders.input_hooks[layer] for layer in feats}
    unknown = [h for h in hooks.values() if h not in model.hook_dict]
    if unknown:
        raise InputError(f"The model has no hook {unknown[0]!r} (the transcoders' input); check "
                         "ts.check_model(model).")
    stops = [_layer_of(h, model.cfg.n_layers) for h in hooks.values()]
    stop = None if any(s is None for s in stops) else max(stops)  # type: ignore[type-var]
    stream = text if isinstance(text, PackedContexts) else contexts(text, model.require_tokenizer(), context_len,
                                                                     seed=seed)
    if stream.context_len != context_len:
        raise InputError(f"The PackedContexts has context_len {stream.context_len}, not {context_len}.")
    max_ctx = math.ceil(tokens / context_len)
    bos = stream.describe().get("bos_token_id") if exclude_bos else None
    states = {layer: _State(f.numel(), top_k, hist_bins, 1, context_len) for layer, f in feats.items()}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_ctx, unit="ctx", desc="graph feature stats")
    it, consumed, n_tokens = iter(stream), 0, 0
    with torch.no_grad():
        while consumed < max_ctx:
            rows = [r for _, r in zip(range(min(batch_size, max_ctx - consumed)), it)]
            if not rows:
                break
            batch = torch.stack(rows)  # [B, T]
            _, cache = model.run_with_cache(batch.to(model.device), names_filter=list(set(hooks.values())),
                                            stop_at_layer=stop, return_type=None)
            keep = None if bos is None else (batch != int(bos))[..., None]  # [B, T, 1]
            for layer, f in feats.items():  # over layers (a graph's few), never over features or tokens
                x = cache[hooks[layer]].to(transcoders.device)  # [B, T, d_in]
                a = transcoders.encode(layer, x)[..., f.to(x.device)].float().cpu()  # [B, T, F]
                if keep is not None:
                    a = a * keep
                states[layer].update(a, batch, consumed, seed)
            consumed += batch.shape[0]
            n_tokens += batch.numel() if keep is None else int(keep.sum())
            if bar is not None:
                bar.update(batch.shape[0])
    if bar is not None:
        bar.close()
    if consumed == 0:
        raise EmptyCorpusError(f"The text source gave no context of {context_len} tokens.")
    out = {}
    for layer, st in states.items():
        st.consumed, st.n_tokens = consumed, n_tokens
        out[layer] = st.result(feats[layer].clone(), meta={
            "model_name": model.cfg.model_name, "hook": hooks[layer], "stream": stream.describe(),
            "context_len": context_len, "top_k": top_k, "exclude_bos": exclude_bos})
    return out
