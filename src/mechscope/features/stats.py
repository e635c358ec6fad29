"""Per-feature statistics of a sparse coder over a text stream, in one streaming pass.

    stats = feature_stats(model, coder, "sotu", tokens=1_000_000)
    stats.density[f], stats.top_values[f], stats.top_tokens[f], stats.top_acts[f], stats.logit_top_ids[f]

Every accumulator has a size fixed by (n_features, top_k, hist_bins, n_quantiles), never by the number
of tokens, so peak memory is flat however long the run. Choices (documented because they shape results):

- Histogram: `hist_bins` fixed log-spaced bins over [1e-4, 1e4) of the NONZERO activations (values outside
  clamp into the end bins). Fixed bins need no first-batch calibration, so a resumed run and a fresh run
  bin identically and features of any scale are resolved (4 bins per decade at the default 32).
- Top-k: per feature, a running top-k over [previous top-k ++ this batch's top-k] (an exact topk over
  int64 keys, then a small stable sort) so ties go to the earliest token (the same answer as sorting every
  activation). Entries with activation 0 are empty (context -1). Each entry carries its context's tokens
  and the feature's activation on every one of them ([F, k, T], a fixed size), so there is no second
  pass over the corpus.
- Quantile samples: for each (feature, histogram bin), a uniform random sample without replacement of
  `n_quantiles` firing tokens (bottom-k sampling: every firing token gets a random priority, the m lowest
  are kept). Priorities come from a generator seeded by (seed, first context of the batch), so a resumed
  run draws exactly what an uninterrupted one would. Each sample keeps a small window of its context's
  tokens (`sample_window` before / after it) so dashboards show its text like the top examples'.
- Logit effects: decoder rows through the final norm's weight (centred first for LayerNorm; the scale is
  a positive per-token factor and is left out) and the unembedding: the direct effect on each token's
  logit of writing the feature, per unit activation.

With `out`, a checkpoint (accumulators + contexts consumed) is written atomically every
`checkpoint_every` batches and a rerun with the same settings resumes after the consumed contexts,
giving the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from mechscope.data.packing import PackedContexts, contexts
from mechscope.data.sources import TextSource
from mechscope.errors import InputError
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.models.hooks import layer_of
from mechscope.models.identity import content_key

__all__ = ["FeatureStats", "check_coder", "feature_stats", "latent_acts_fn", "logit_effects", "without_token"]

HIST_LO, HIST_HI = 1e-4, 1e4  # log-spaced histogram range of nonzero activations
STATS_FILE, META_FILE = "feature_stats.safetensors", "feature_stats.json"
CKPT_FILE, CKPT_META = "checkpoint.safetensors", "checkpoint.json"
_EMPTY = -1  # context id of an empty top-k / sample slot


@dataclass
class FeatureStats:
    """Results for F tracked features (`features` maps row -> latent index). Tensors on CPU."""

    features: torch.Tensor  # [F] long: latent index of each row
    n_tokens: int
    n_contexts: int
    count: torch.Tensor  # [F] long: tokens where the feature fired (> 0)
    act_sum: torch.Tensor  # [F] float64: sum of activations
    act_max: torch.Tensor  # [F] float32
    hist: torch.Tensor  # [F, bins] long: counts of nonzero activations per bin
    hist_edges: torch.Tensor  # [bins + 1] float64 (end bins also hold the clamped outliers)
    top_values: torch.Tensor  # [F, k] float32, descending; 0 where empty
    top_context: torch.Tensor  # [F, k] long: context id in the packed stream; -1 where empty
    top_pos: torch.Tensor  # [F, k] long: position in the context; -1 where empty
    top_tokens: torch.Tensor  # [F, k, T] long: tokens of each top context (-1 where empty)
    top_acts: torch.Tensor  # [F, k, T] float32: the feature's activation on every token of it
    sample_values: torch.Tensor  # [F, bins, m] float32: random firing examples per histogram bin; 0 where empty
    sample_context: torch.Tensor  # [F, bins, m] long; -1 where empty
    sample_pos: torch.Tensor  # [F, bins, m] long; -1 where empty
    logit_top_ids: torch.Tensor | None  # [F, n_logits] long: tokens most promoted (direct effect)
    logit_top_values: torch.Tensor | None  # [F, n_logits] float32
    logit_bottom_ids: torch.Tensor | None  # [F, n_logits] long: tokens most suppressed
    logit_bottom_values: torch.Tensor | None  # [F, n_logits] float32
    meta: dict[str, Any] = field(default_factory=dict)
    # [F, bins, m, W] int32: the tokens around each sample (meta["sample_window"] = [before, after]; the sample
    # is at index `before`), -1 outside its context or where empty; None in statistics saved before they had it
    sample_tokens: torch.Tensor | None = None

    @property
    def density(self) -> torch.Tensor:  # [F] fraction of tokens where the feature fired
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> torch.Tensor:  # [F] mean activation when firing (0 for dead features)
        return self.act_sum / self.count.clamp(min=1).double()

    def save(self, folder: str | Path) -> Path:
        """Write feature_stats.safetensors + feature_stats.json (atomically) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        atomic_write_bytes(folder / STATS_FILE, st_save(tensors))
        atomic_write_json(folder / META_FILE, {"n_tokens": self.n_tokens, "n_contexts": self.n_contexts,
                                               "meta": self.meta})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        folder = Path(folder)
        if not (folder / STATS_FILE).exists():
            raise InputError(f"No {STATS_FILE} in {folder}; run feature_stats(..., out={str(folder)!r}) first.")
        t = load_file(str(folder / STATS_FILE))
        j = json.loads((folder / META_FILE).read_text())
        kw = {f.name: t.get(f.name) for f in fields(cls) if f.name not in ("n_tokens", "n_contexts", "meta")}
        return cls(n_tokens=j["n_tokens"], n_contexts=j["n_contexts"], meta=j["meta"], **kw)


# ---------------------------------------------------------------------------- pieces


def logit_effects(model, coder, features: torch.Tensor | None = None) -> torch.Tensor:
    """[F, V] direct logit effect of each feature's decoder row: centre (LayerNorm only), times the final
    norm's weight (when not folded away), times W_U. The final scale is left out (positive per token)."""
    w_dec = coder.W_dec.detach().float()  # [n, d_out]
    if features is not None:
        w_dec = w_dec[features.to(w_dec.device)]
    c = model.cfg
    if w_dec.shape[-1] != c.d_model:
        raise InputError(f"The coder writes {w_dec.shape[-1]}-dim vectors, not the residual stream (d_model "
                         f"{c.d_model}); logit effects need a coder whose output lives in the residual.")
    if not c.has_unembed:
        raise InputError(f"{c.architecture} has no unembedding; logit effects are undefined.")
    d = w_dec.to(model.W_U.device)
    if c.final_norm:
        if c.normalization == "LN":
            d = d - d.mean(-1, keepdim=True)
        w = getattr(model.ln_final, "w", None)
        if w is not None:
            d = d * w.detach().float()
    return d @ model.W_U.detach().float()  # [F, V]


def _layer_of(hook: str, n_layers: int) -> int | None:
    """stop_at_layer that still computes `hook` (None: needs the whole model)."""
    layer = layer_of(hook)
    if layer is not None:
        return layer + 1 if layer + 1 < n_layers else None
    return 0 if hook in ("hook_embed", "hook_pos_embed", "hook_tokens") else None


def latent_acts_fn(model, coder, hook: str, stop: int | None, feats: torch.Tensor | None):
    """A function tokens [B, T] -> latent acts [B, T, F] (float32, CPU) of the tracked features `feats` (all
    latents when None). One forward pass stopped at `stop` (see check_coder), shared by the statistics pass,
    detection windows and feature search so all three see exactly the same activations."""

    def run(tokens: torch.Tensor) -> torch.Tensor:
        _, cache = model.run_with_cache(tokens.to(model.device), names_filter=hook, stop_at_layer=stop,
                                        return_type=None)
        x = cache[hook]
        if x.dim() > 3:  # per-head hooks [B, T, H, d_head]: coders read the heads concatenated
            x = x.flatten(2)
        f = coder.encode(x.to(coder.W_enc.device)).float()  # [B, T, n]
        return (f if feats is None else f[..., feats.to(f.device)]).cpu()

    return run


def without_token(run, token_id: int):
    """`run` (a latent_acts_fn) with the activations at every occurrence of token_id set to 0 (not firing):
    how BOS positions are excluded, since the BOS residual is the same in every context."""

    def masked(tokens: torch.Tensor) -> torch.Tensor:
        acts = run(tokens)  # [B, T, F]
        return acts.masked_fill((tokens == token_id).to(acts.device)[..., None], 0.0)

    return masked


def check_coder(model, coder, feats: torch.Tensor | None) -> tuple[str, int | None]:
    """(hook the coder reads, stop_at_layer that still computes it), after refusing a coder that does not fit
    the model (sae.sources.check_coder_fits: unknown hook, other width, other model) or latent indices out of
    range, with a typed error."""
    from mechscope.sae.sources import check_coder_fits

    hook, _ = check_coder_fits(model, coder, target_hook=None)  # the input hook: these are its latents
    stop = _layer_of(hook, model.cfg.n_layers)
    if feats is not None and (feats.numel() == 0 or feats.min() < 0 or feats.max() >= coder.cfg.n_latents):
        raise InputError(f"features must be a non-empty list of latent indices in [0, {coder.cfg.n_latents}).")
    return hook, stop


class _State:
    """The bounded accumulators: sizes depend on (F, k, bins, m) only."""

    NAMES = ("count", "act_sum", "act_max", "hist", "top_values", "top_context", "top_pos", "top_tokens",
             "top_acts", "s_prio", "s_values", "s_context", "s_pos", "s_tokens")

    def __init__(self, F: int, k: int, bins: int, m: int, T: int, window: tuple[int, int] = (8, 2)):
        self.F, self.k, self.bins, self.m = F, k, bins, m
        self.window = window
        W = window[0] + 1 + window[1]
        self.count = torch.zeros(F, dtype=torch.long)
        self.act_sum = torch.zeros(F, dtype=torch.float64)
        self.act_max = torch.zeros(F)
        self.hist = torch.zeros(F, bins, dtype=torch.long)
        self.top_values = torch.zeros(F, k)
        self.top_context = torch.full((F, k), _EMPTY, dtype=torch.long)
        self.top_pos = torch.full((F, k), _EMPTY, dtype=torch.long)
        self.top_tokens = torch.full((F, k, T), _EMPTY, dtype=torch.int32)  # [F, k, T] tokens of each top context
        self.top_acts = torch.zeros(F, k, T)  # [F, k, T] the feature's activation on each of them
        G = F * bins
        self.s_prio = torch.full((G, m), math.inf)  # bottom-k sampling priorities
        self.s_values = torch.zeros(G, m)
        self.s_context = torch.full((G, m), _EMPTY, dtype=torch.long)
        self.s_pos = torch.full((G, m), _EMPTY, dtype=torch.long)
        self.s_tokens = torch.full((G, m, W), _EMPTY, dtype=torch.int32)  # [G, m, W] tokens around each sample
        self.consumed = 0  # contexts
        self.n_tokens = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.NAMES}

    def result(self, features: torch.Tensor, *, logits: tuple = (None, None, None, None),
               meta: dict[str, Any] | None = None) -> FeatureStats:
        """The accumulators as a FeatureStats for the latents `features` [F]; logits: (top ids, top values,
        bottom ids, bottom values) or Nones."""
        G = (self.F, self.bins, self.m)
        lt, ltv, lb, lbv = logits
        return FeatureStats(
            features=features, n_tokens=self.n_tokens, n_contexts=self.consumed, count=self.count,
            act_sum=self.act_sum, act_max=self.act_max, hist=self.hist, hist_edges=_edges(self.bins),
            top_values=self.top_values, top_context=self.top_context, top_pos=self.top_pos,
            top_tokens=self.top_tokens.long(), top_acts=self.top_acts, sample_values=self.s_values.view(G),
            sample_context=self.s_context.view(G), sample_pos=self.s_pos.view(G),
            sample_tokens=self.s_tokens.view(*G, -1), logit_top_ids=lt, logit_top_values=ltv, logit_bottom_ids=lb,
            logit_bottom_values=lbv, meta=dict(meta or {}) | {"hist_range": [HIST_LO, HIST_HI],
                                                               "sample_window": list(self.window)})

    def update(self, acts: torch.Tensor, tokens: torch.Tensor, first_ctx: int, seed: int) -> None:
        """acts [B, T, F] of contexts first_ctx .. first_ctx + B - 1, whose tokens are tokens [B, T]."""
        B, T, F = acts.shape
        flat = acts.reshape(B * T, F)  # [N, F]
        tok, feat = (flat > 0).nonzero(as_tuple=True)  # [E] the firing (token, feature) pairs, token-major
        a = flat[tok, feat]  # [E]
        # sums over the firing entries only (activations are >= 0: the rest add nothing); float64 accumulation
        self.count += torch.bincount(feat, minlength=F)
        self.act_sum += torch.bincount(feat, weights=a.double(), minlength=F)
        self.act_max.scatter_reduce_(0, feat, a, reduce="amax")
        # top-k: this batch's best k per feature, merged with the running ones; ties go to the earliest token
        # (the answer of a stable sort of every activation). Only features whose batch max beats their current
        # k-th value can change (an equal value loses to the earlier entry), so after warm-up the candidates
        # are computed for few features. The running entries (all earlier) sit before this batch's candidates
        # in the small stable merge sort.
        bmax = torch.zeros(F).scatter_reduce_(0, feat, a, reduce="amax")  # [F] this batch's max (0: silent)
        sel = (bmax > self.top_values[:, -1]).nonzero().squeeze(1)  # [S]
        if sel.numel():
            kk = min(self.k, B * T)
            x = flat[:, sel].T  # [S, N]
            i = _topk_earliest(x, kk)  # [S, kk] token index in the batch, best first
            v = x.gather(1, i)
            c_row = torch.div(i, T, rounding_mode="floor")  # [S, kk] context row in the batch
            cand_v = torch.cat([self.top_values[sel], v], 1)
            cand_c = torch.cat([self.top_context[sel], first_ctx + c_row], 1)
            cand_p = torch.cat([self.top_pos[sel], i % T], 1)
            v2, j = torch.sort(cand_v, dim=1, descending=True, stable=True)
            v2, j = v2[:, : self.k], j[:, : self.k]
            empty = v2 <= 0
            self.top_values[sel] = v2.masked_fill(empty, 0.0)
            self.top_context[sel] = cand_c.gather(1, j).masked_fill(empty, _EMPTY)
            self.top_pos[sel] = cand_p.gather(1, j).masked_fill(empty, _EMPTY)
            # each entry's context tokens and the feature's activation on every one of them travel with it, so
            # no second pass over the corpus is needed
            jt = j[..., None].expand(-1, -1, T)  # [S, k, T]
            cand_tok = torch.cat([self.top_tokens[sel], tokens.int()[c_row]], 1)  # [S, k + kk, T] (int32: half the copying)
            cand_act = torch.cat([self.top_acts[sel], acts.permute(2, 0, 1)[sel[:, None], c_row]], 1)
            e = empty[..., None]
            self.top_tokens[sel] = cand_tok.gather(1, jt).masked_fill(e, _EMPTY)
            self.top_acts[sel] = cand_act.gather(1, jt).masked_fill(e, 0.0)
        # histogram + per-bin samples over the firing (token, feature) pairs only
        if tok.numel() == 0:
            return
        b = _bin(a, self.bins)
        g = feat * self.bins + b  # [E] group (feature, bin)
        self.hist += torch.bincount(g, minlength=F * self.bins).view(F, self.bins)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + first_ctx) % (2**63))
        prio = torch.rand(tok.numel(), generator=gen)
        # per group, keep the m lowest priorities of this batch: sort by (group, priority), rank in group
        order = torch.argsort(prio)
        order = order[torch.argsort(g[order], stable=True)]
        gs = g[order]
        starts = torch.searchsorted(gs, gs, right=False)
        rank = torch.arange(gs.numel()) - starts
        keep = order[rank < self.m]
        rk = rank[rank < self.m]
        # merge into the running samples of the groups this batch touched only
        gk = g[keep]
        ug, at = torch.unique(gk, return_inverse=True)  # [U] touched groups; at: row of each kept entry
        U = ug.numel()
        new_p = torch.full((U, self.m), math.inf)
        new_v, new_c, new_s = torch.zeros(U, self.m), torch.full((U, self.m), _EMPTY), torch.full((U, self.m), _EMPTY)
        new_p[at, rk] = prio[keep]
        new_v[at, rk] = a[keep]
        new_c[at, rk] = first_ctx + torch.div(tok[keep], T, rounding_mode="floor")
        new_s[at, rk] = tok[keep] % T
        # the tokens around each kept sample: positions pos - before .. pos + after of its context
        b0, a0 = self.window
        W = b0 + 1 + a0
        row, pos = torch.div(tok[keep], T, rounding_mode="floor"), tok[keep] % T  # [K]
        idx = pos[:, None] + torch.arange(-b0, a0 + 1)  # [K, W]
        inside = (idx >= 0) & (idx < T)
        win = tokens.int()[row[:, None], idx.clamp(0, T - 1)].masked_fill(~inside, _EMPTY)  # [K, W]
        new_t = torch.full((U, self.m, W), _EMPTY, dtype=torch.int32)
        new_t[at, rk] = win
        p2, j = torch.topk(torch.cat([self.s_prio[ug], new_p], 1), self.m, dim=1, largest=False)
        self.s_prio[ug] = p2
        self.s_values[ug] = torch.cat([self.s_values[ug], new_v], 1).gather(1, j)
        self.s_context[ug] = torch.cat([self.s_context[ug], new_c], 1).gather(1, j)
        self.s_pos[ug] = torch.cat([self.s_pos[ug], new_s], 1).gather(1, j)
        self.s_tokens[ug] = torch.cat([self.s_tokens[ug], new_t], 1).gather(1, j[..., None].expand(-1, -1, W))


def _topk_earliest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [F, k] of the k largest entries of each row of x [F, N] (activations >= 0), ties broken by the
    lowest index (what a stable sort of every entry gives). A plain topk, re-sorted by (value, index); rows
    with a tie AT the k-th value (topk may have picked any of the tied entries) are redone exactly with one
    topk over int64 keys = (float bits << 32) | (2^32 - 1 - index) (non-negative float32 bit patterns order
    like their values)."""
    x = x.clamp(min=0)
    v, i = x.topk(k, dim=1)  # [F, k]
    kth = v[:, -1:]
    tied = ((x == kth).sum(1) > (v == kth).sum(1)) & (kth[:, 0] > 0)  # more entries equal the k-th than kept
    # order the picked k by value desc, then index asc
    i, _ = i.sort(dim=1)
    v = x.gather(1, i)
    _, o = v.sort(dim=1, descending=True, stable=True)
    i = i.gather(1, o)
    rows = tied.nonzero().squeeze(1)
    if rows.numel():
        bits = x[rows].contiguous().view(torch.int32).long()  # [R, N]
        keys = (bits << 32) | (0xFFFFFFFF - torch.arange(x.shape[1], dtype=torch.long))
        i[rows] = 0xFFFFFFFF - (keys.topk(k, dim=1).values & 0xFFFFFFFF)
    return i


def _edges(bins: int) -> torch.Tensor:
    return torch.logspace(math.log10(HIST_LO), math.log10(HIST_HI), bins + 1, dtype=torch.float64)


def _bin(a: torch.Tensor, bins: int) -> torch.Tensor:
    """Histogram bin of positive activations a [E] -> [E] long in [0, bins)."""
    lo, hi = math.log10(HIST_LO), math.log10(HIST_HI)
    x = (torch.log10(a.double()) - lo) * (bins / (hi - lo))
    return x.floor().clamp(0, bins - 1).long()


# ---------------------------------------------------------------------------- the pass


def feature_stats(
    model,
    coder,
    text: Any = "sotu",
    *,
    tokens: int | None = None,
    context_len: int = 64,
    batch_size: int = 8,
    top_k: int = 10,
    n_quantiles: int = 4,
    hist_bins: int = 32,
    n_logits: int = 10,
    seed: int = 0,
    features: Any = None,
    out: str | Path | None = None,
    checkpoint_every: int = 50,
    exclude_bos: bool = True,
    sample_window: tuple[int, int] = (8, 2),
    progress: bool = True,
) -> FeatureStats:
    """One streaming pass over `text` (a corpus name / anything `contexts` accepts, or a PackedContexts)
    computing, for each latent (or only `features`): density, mean/max, a log-binned histogram, the
    `top_k` top-activating contexts with token-level activations, `n_quantiles` random examples per
    histogram bin, and the top/bottom `n_logits` direct logit effects. tokens: stop after about this many
    tokens (whole contexts; None: the whole source). out: save there and checkpoint/resume.
    exclude_bos: BOS positions count as not firing and are not counted as tokens (the BOS residual is the
    same in every context, so a feature firing on it would fill its top-k with identical BOS examples).
    sample_window: (tokens before, tokens after) kept around each quantile sample (its text on dashboards)."""
    for name, v, lo in (("context_len", context_len, 2), ("batch_size", batch_size, 1), ("top_k", top_k, 1),
                        ("n_quantiles", n_quantiles, 1), ("hist_bins", hist_bins, 1), ("n_logits", n_logits, 1),
                        ("checkpoint_every", checkpoint_every, 1)):
        if not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}.")
    if not (isinstance(sample_window, (tuple, list)) and len(sample_window) == 2
            and all(isinstance(v, int) and v >= 0 for v in sample_window)):
        raise InputError(f"sample_window must be (tokens_before, tokens_after) >= 0, got {sample_window!r}.")
    sample_window = (int(sample_window[0]), int(sample_window[1]))
    if tokens is not None and (not isinstance(tokens, int) or tokens < context_len):
        raise InputError(f"tokens must be None or an int >= context_len ({context_len}), got {tokens!r}.")
    feats = None
    if features is not None:
        feats = torch.as_tensor(features, dtype=torch.long).flatten()
    hook, stop = check_coder(model, coder, feats)
    if context_len > model.cfg.n_ctx:
        raise InputError(f"context_len {context_len} exceeds the model's n_ctx {model.cfg.n_ctx}.")
    if isinstance(text, PackedContexts):
        stream = text
    elif isinstance(text, TextSource):  # keeps the order and split it was made with
        stream = contexts(text, model.tokenizer, context_len)
    else:
        stream = contexts(text, model.tokenizer, context_len, seed=seed)
    if stream.context_len != context_len:
        raise InputError(f"The PackedContexts has context_len {stream.context_len}, not {context_len}.")
    max_ctx = None if tokens is None else tokens // context_len
    F = coder.cfg.n_latents if feats is None else feats.numel()
    ident = {"stream": stream.describe(), "coder": coder.cfg.to_dict(), "hook": hook, "context_len": context_len,
             "batch_size": batch_size, "top_k": top_k, "n_quantiles": n_quantiles, "hist_bins": hist_bins,
             "n_logits": n_logits, "seed": seed, "max_contexts": max_ctx,
             "features": None if feats is None else feats.tolist(), "model": content_key(model),
             "exclude_bos": exclude_bos, "sample_window": list(sample_window)}
    ident = json.loads(json.dumps(ident, default=str))
    folder = Path(out) if out is not None else None
    if folder is not None and (folder / META_FILE).exists():
        done = FeatureStats.load(folder)
        if done.meta.get("settings") == ident:
            return done
    st = _State(F, top_k, hist_bins, n_quantiles, context_len, sample_window)
    if folder is not None and (folder / CKPT_META).exists():
        cm = json.loads((folder / CKPT_META).read_text())
        if cm.get("settings") == ident:
            for n, t in load_file(str(folder / CKPT_FILE)).items():
                setattr(st, n, t)
            st.consumed, st.n_tokens = cm["consumed"], cm["n_tokens"]

    run = latent_acts_fn(model, coder, hook, stop, feats)
    bos_id = stream.describe().get("bos_token_id") if exclude_bos else None
    if bos_id is not None:
        run = without_token(run, int(bos_id))
    total = None if max_ctx is None else max_ctx
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=st.consumed, unit="ctx", desc="feature stats")
    it = iter(stream.skip(st.consumed))
    n_batches = 0
    with torch.no_grad():
        while max_ctx is None or st.consumed < max_ctx:
            want = batch_size if max_ctx is None else min(batch_size, max_ctx - st.consumed)
            rows = [r for _, r in zip(range(want), it)]
            if not rows:
                break
            batch = torch.stack(rows)  # [B, T]
            st.update(run(batch), batch, st.consumed, seed)
            st.consumed += batch.shape[0]
            st.n_tokens += batch.numel() if bos_id is None else int((batch != bos_id).sum())
            n_batches += 1
            if bar is not None:
                bar.update(batch.shape[0])
            if folder is not None and n_batches % checkpoint_every == 0:
                _checkpoint(folder, st, ident)
    if bar is not None:
        bar.close()
    if st.consumed == 0:
        from mechscope.errors import EmptyCorpusError

        raise EmptyCorpusError(f"The text source gave no context of {context_len} tokens.")
    lt = lb = ltv = lbv = None
    try:
        ltv, lt, lbv, lb = _top_logit_effects(model, coder, feats, n_logits)
        logit_note = None
    except InputError as e:  # e.g. a transcoder writing an MLP hidden layer: everything else still holds
        logit_note = str(e)
    res = st.result(torch.arange(F) if feats is None else feats.clone(), logits=(lt, ltv, lb, lbv),
                    meta={"settings": ident, "model_name": model.cfg.model_name, "logit_effects_note": logit_note})
    if folder is not None:
        res.save(folder)
        for f in (CKPT_FILE, CKPT_META):
            (folder / f).unlink(missing_ok=True)
    return res


def _top_logit_effects(model, coder, feats: torch.Tensor | None, n: int, chunk: int = 256):
    """Top / bottom n direct logit effects per feature, computed `chunk` features at a time: the full [F, V]
    matrix would be ~0.9 GB for 4,608 latents x 49k tokens."""
    F = coder.cfg.n_latents if feats is None else feats.numel()
    ids = torch.arange(F) if feats is None else feats
    parts: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, F, chunk):
        eff = logit_effects(model, coder, ids[s : s + chunk])  # [c, V]
        nl = min(n, eff.shape[-1])
        tv, ti = eff.topk(nl, dim=-1)
        bv, bi = eff.topk(nl, dim=-1, largest=False)
        parts.append((tv.cpu(), ti.cpu(), bv.cpu(), bi.cpu()))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def _checkpoint(folder: Path, st: _State, ident: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / CKPT_FILE, st_save({n: t.contiguous() for n, t in st.tensors().items()}))
    atomic_write_json(folder / CKPT_META, {"settings": ident, "consumed": st.consumed, "n_tokens": st.n_tokens})
