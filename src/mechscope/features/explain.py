"""Feature explanations: an offline keyword explainer and a pluggable LLM explainer.

    expl = explain_offline(stats, model.tokenizer, background=token_counts(train_stream, len(tok)))
    expl = explain_llm(stats, model.tokenizer, OpenAIExplainer("http://localhost:8000/v1", "qwen"))
    save_explanations(expl, "explanations.json")

An `Explanation` is a text plus, for the offline explainer, the token n-grams (`terms`) it claims the
feature fires at. An n-gram ENDS at the firing token: (t,) is the firing token itself, (a, t) is the
token before it and the firing token. `mechscope.features.detection` turns explanations into a number
(detection balanced accuracy on held-out text).

The offline explainer is a baseline, not an interpretation: it finds the few tokens / bigrams that best
separate where the feature fires from where it does not, i.e. a keyword list. Features that respond to
meaning, position or syntax get a poor keyword list and, honestly, a poor detection score.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.data.packing import PackedContexts, as_tokenizer, tokenizer_vocab_size
from mechscope.errors import CorruptFileError, ExplainerError, InputError, OutputNotWritableError
from mechscope.fileio import atomic_write_json

__all__ = [
    "Explanation",
    "OpenAIExplainer",
    "call_explainer",
    "decode_many",
    "explain_llm",
    "explain_offline",
    "load_explanations",
    "save_explanations",
    "token_counts",
]

FORMAT, VERSION = "mechscope.explanations", 1
SOURCES = ("offline", "llm")
_PAD = -1  # empty token slot in FeatureStats.top_tokens


@dataclass
class Explanation:
    """What a feature responds to. terms: token-id n-grams ending at the firing token (offline explainer
    only; [] for LLM explanations, which an LLM detector scores instead)."""

    feature: int  # latent index
    text: str
    terms: list[tuple[int, ...]] = field(default_factory=list)
    source: str = "offline"  # "offline" | "llm"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.terms = [tuple(int(t) for t in term) for term in self.terms]

    def to_dict(self) -> dict[str, Any]:
        return {"feature": int(self.feature), "text": self.text, "terms": [list(t) for t in self.terms],
                "source": self.source, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any) -> Explanation:
        if not isinstance(d, dict):
            raise InputError(f"An explanation is a dict, got {type(d).__name__}.")
        feature, text, terms = d.get("feature"), d.get("text"), d.get("terms", [])
        source, meta = d.get("source", "offline"), d.get("meta", {})
        if not isinstance(feature, int) or isinstance(feature, bool) or feature < 0:
            raise InputError(f"Explanation 'feature' must be a latent index (int >= 0), got {feature!r}.")
        if not isinstance(text, str):
            raise InputError(f"Explanation of feature {feature}: 'text' must be a str, got {type(text).__name__}.")
        if not isinstance(terms, list) or not all(
            isinstance(t, (list, tuple)) and t and all(isinstance(i, int) and i >= 0 for i in t) for t in terms
        ):
            raise InputError(f"Explanation of feature {feature}: 'terms' must be a list of non-empty lists of "
                             f"token ids, got {terms!r}.")
        if source not in SOURCES:
            raise InputError(f"Explanation of feature {feature}: source must be one of {SOURCES}, got {source!r}.")
        if not isinstance(meta, dict):
            raise InputError(f"Explanation of feature {feature}: 'meta' must be a dict.")
        return cls(feature=feature, text=text, terms=[tuple(t) for t in terms], source=source, meta=meta)


def save_explanations(explanations: Sequence[Explanation], path: str | Path) -> Path:
    """Write explanations as JSON, atomically (a reader sees the old file or the whole new one)."""
    path = Path(path)
    items = []
    for e in explanations:
        if not isinstance(e, Explanation):
            raise InputError(f"save_explanations takes Explanation objects, got {type(e).__name__}.")
        items.append(e.to_dict())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": FORMAT, "version": VERSION, "explanations": items})
    except (TypeError, ValueError) as e:
        raise InputError(f"An explanation's meta is not JSON-serialisable ({e}); keep meta to str/number/"
                         "list/dict values.") from None
    except OSError as e:
        raise OutputNotWritableError(f"Cannot write {path}: {e}. Choose a writable path.") from None
    return path


def load_explanations(path: str | Path) -> list[Explanation]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No explanations file at {path}; write one with save_explanations(...).")
    try:
        j = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); rewrite it with save_explanations.") from None
    if not isinstance(j, dict) or j.get("format") != FORMAT or not isinstance(j.get("explanations"), list):
        raise CorruptFileError(f"{path} is not a mechscope explanations file (no format {FORMAT!r}).")
    if j.get("version") != VERSION:
        raise CorruptFileError(f"{path} has explanations format version {j.get('version')!r}; this mechscope "
                               f"reads version {VERSION}.")
    try:
        return [Explanation.from_dict(d) for d in j["explanations"]]
    except InputError as e:
        raise CorruptFileError(f"{path}: {e}") from None


def artifact_id(settings: dict[str, Any] | None) -> str | None:
    """A short id of (model, coder config, hook) from a settings dict (FeatureStats.meta['settings'] or
    DetectionSet.meta['settings']), so explanations and detection windows of different coders are never
    scored against each other. None when the settings do not say."""
    if not settings or "coder" not in settings or "model" not in settings:
        return None
    key = {"model": settings["model"], "coder": settings["coder"], "hook": settings.get("hook")}
    blob = json.dumps(json.loads(json.dumps(key, default=str)), sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- corpus counts


def token_counts(tokens: Any, vocab_size: int, *, max_tokens: int | None = None,
                 batch_size: int = 64) -> torch.Tensor:
    """Unigram counts [V] (long) of a token tensor (any shape; negative ids = padding, ignored), a
    PackedContexts (read in batches), or any iterable of token tensors. max_tokens: stop after about
    this many tokens (whole batches). Use it as `background=` of explain_offline, on the TRAIN stream."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise InputError(f"vocab_size must be a positive int, got {vocab_size!r}.")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise InputError(f"max_tokens must be None or a positive int, got {max_tokens!r}.")
    if isinstance(tokens, torch.Tensor):
        chunks: Iterable[Any] = [tokens]
    elif isinstance(tokens, PackedContexts):
        chunks = tokens.batches(batch_size)
    elif isinstance(tokens, Iterable) and not isinstance(tokens, (str, bytes)):
        chunks = tokens
    else:
        raise InputError(f"token_counts takes a token tensor, a PackedContexts or an iterable of token tensors, "
                         f"got {type(tokens).__name__}.")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    seen = 0
    for c in chunks:
        c = torch.as_tensor(c)
        if c.is_floating_point() or c.is_complex():
            raise InputError(f"token_counts needs integer token ids, got dtype {c.dtype}.")
        c = c.reshape(-1).long()
        c = c[c >= 0]
        if c.numel() and int(c.max()) >= vocab_size:
            raise InputError(f"Token id {int(c.max())} >= vocab_size {vocab_size}; pass the tokenizer's full size "
                             "(len(tokenizer)).")
        counts += torch.bincount(c, minlength=vocab_size)
        seen += c.numel()
        if max_tokens is not None and seen >= max_tokens:
            break
    return counts


# ---------------------------------------------------------------------------- helpers


def decode_many(tok: Any, seqs: list[list[int]]) -> list[str]:
    """Decode many token lists in one call (transformers or raw `tokenizers` objects), special tokens
    skipped and spaces kept as they are, so a token's text is the same in explanations and detection."""
    if not seqs:
        return []
    if hasattr(tok, "batch_decode"):
        return list(tok.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return list(tok.decode_batch(seqs, skip_special_tokens=True))


def _rows(stats: Any, features: Any) -> torch.Tensor:
    """Rows of `stats` for the requested latent indices (all rows when None)."""
    F = stats.features.numel()
    if features is None:
        return torch.arange(F)
    want = torch.as_tensor(features, dtype=torch.long).flatten()
    if want.numel() == 0:
        raise InputError("features must name at least one latent.")
    order = torch.argsort(stats.features)
    srt = stats.features[order]
    pos = torch.searchsorted(srt, want).clamp(max=F - 1)
    found = srt[pos] == want
    if not bool(found.all()):
        missing = want[~found][:10].tolist()
        raise InputError(f"Latents {missing} are not in these FeatureStats (they track {F} latents); compute "
                         "feature_stats for them first.")
    return order[pos]


def _check_stats(stats: Any) -> None:
    for name in ("features", "top_tokens", "top_acts", "top_context"):
        if not isinstance(getattr(stats, name, None), torch.Tensor):
            raise InputError(f"Expected a FeatureStats (from feature_stats), got {type(stats).__name__} without "
                             f"tensor field {name!r}.")
    if stats.top_tokens.shape != stats.top_acts.shape or stats.top_tokens.dim() != 3:
        raise InputError(f"FeatureStats top_tokens {tuple(stats.top_tokens.shape)} and top_acts "
                         f"{tuple(stats.top_acts.shape)} must both be [F, k, T].")


def _active_mask(tokens: torch.Tensor, acts: torch.Tensor, ctx: torch.Tensor, threshold: float):
    """(keep [R, k], valid [R, k, T], active [R, k, T]): a feature's top-k may list one context several
    times (several firing positions); each context counts once. Active: activation > 0 and >= threshold
    times that context's max."""
    k = ctx.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool).tril(-1)
    dup = ((ctx[:, :, None] == ctx[:, None, :]) & earlier).any(-1)  # [R, k]
    keep = (ctx >= 0) & ~dup
    valid = (tokens >= 0) & keep[..., None]  # [R, k, T]
    a = acts.float().masked_fill(~valid, 0.0)
    cmax = a.amax(-1, keepdim=True)  # [R, k, 1]
    active = valid & (a > 0) & (a >= threshold * cmax)
    return keep, valid, active


def _check_float(name: str, v: Any, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise InputError(f"{name} must be a number in [{lo}, {hi}], got {v!r}.")


def _check_int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InputError(f"{name} must be an int >= {lo}, got {v!r}.")


# ---------------------------------------------------------------------------- offline explainer


def explain_offline(
    stats: Any,
    tokenizer: Any,
    *,
    background: torch.Tensor | None = None,
    features: Any = None,
    max_terms: int = 4,
    min_share: float = 0.05,
    threshold: float = 0.5,
    window: int = 16,
) -> list[Explanation]:
    """Keyword explanations from each feature's top contexts (vectorised over features).

    Active positions: in each (deduplicated) top context, tokens whose activation is > 0 and >= `threshold`
    times that context's max. Candidates: the unigram at each active position and the bigram ending there.
    For each candidate x of feature f:
      share(x) = fraction of f's active positions it covers (what a keyword detector would catch),
      prec(x)  = (active occurrences + 0.5) / (occurrences + 1) within f's top contexts (optimistic: those
                 contexts were picked because f fires in them),
      p(x)     = corpus frequency per token: `background` unigram counts [V] when given (pass
                 token_counts of the train stream), else counts over the pooled top contexts of all rows of
                 `stats`; a bigram (a, b) gets p(b) * P(a before b) from the pooled contexts.
    A term raises a detector's true-positive rate by ~share and its false-alarm rate on a `window`-token
    window by ~1 - (1 - p(x) (1 - prec(x)))^window. Terms are chosen greedily (all features at once) by
    that gain: the best one always, then up to max_terms - 1 more while each adds >= min_share of new
    coverage and a positive gain. A bigram competes only when it is more precise than its last token alone,
    and one made redundant by a later unigram of its last token is dropped.

    Returns one Explanation per live feature, in row order. Dead features (no top context, or no positive
    activation in them) get NO explanation: they are skipped, not given an empty one.
    meta: est_tpr / est_fpr (the estimates above), per-term share, precision and frequency, n_active,
    n_contexts, artifact (model/coder id).
    """
    _check_stats(stats)
    tok = as_tokenizer(tokenizer)
    _check_int("max_terms", max_terms, 1)
    _check_int("window", window, 1)
    _check_float("min_share", min_share, 0.0, 1.0)
    _check_float("threshold", threshold, 0.0, 1.0)
    rows = _rows(stats, features)
    all_tokens = stats.top_tokens
    V = max(tokenizer_vocab_size(tok), int(all_tokens.max()) + 1 if all_tokens.numel() else 1)
    if background is not None:
        background = torch.as_tensor(background)
        if background.dim() != 1 or background.numel() < V:
            raise InputError(f"background must be unigram counts [V] with V >= {V} (the tokenizer's size), got "
                             f"shape {tuple(background.shape)}; build it with token_counts(stream, len(tokenizer)).")
        if bool((background < 0).any()) or float(background.sum()) <= 0:
            raise InputError("background counts must be >= 0 with a positive total.")
    tokens = all_tokens[rows]  # [R, k, T]
    acts = stats.top_acts[rows]  # [R, k, T]
    ctx = stats.top_context[rows]  # [R, k]
    R, k, T = tokens.shape
    K = V + V * V  # key space per feature: unigram t -> t; bigram (a, t) -> V + a * V + t
    if R * K >= 2**62:
        raise InputError(f"{R} features x vocabulary {V} overflow the n-gram keys; explain fewer features at once "
                         "(features=...).")
    keep, valid, active = _active_mask(tokens, acts, ctx, threshold)

    # corpus frequencies: per-token probability of every unigram and (via the pooled contexts) bigram
    p_uni, pool_bi_keys, pool_bi_counts, pool_uni = _background(stats, V, background)

    f_of = torch.arange(R).view(R, 1, 1).expand(R, k, T)
    prev = torch.cat([torch.full((R, k, 1), _PAD, dtype=torch.long), tokens[..., :-1]], -1)  # [R, k, T]
    has_prev = prev >= 0
    uni_key = f_of * K + tokens.clamp(min=0)  # [R, k, T]
    bi_key = f_of * K + V + prev.clamp(min=0) * V + tokens.clamp(min=0)
    ua, ba, hb = uni_key[active], bi_key[active], has_prev[active]  # [E] per active position
    n_act = torch.bincount(f_of[active], minlength=R)  # [R]
    explanations: list[Explanation] = []
    if ua.numel() == 0:
        return explanations
    cand = torch.cat([ua, ba[hb]]).unique()  # [C] sorted: by feature, then unigrams before bigrams
    C = cand.numel()
    ui = torch.searchsorted(cand, ua)  # [E]
    bi = torch.where(hb, torch.searchsorted(cand, ba), 0)  # [E] (meaningless where ~hb)
    c_active = (torch.bincount(ui, minlength=C) + torch.bincount(bi[hb], minlength=C)).double()
    c_any = _occurrences(cand, uni_key[valid]) + _occurrences(cand, bi_key[valid & has_prev])
    f_c = torch.div(cand, K, rounding_mode="floor")  # [C] row of each candidate
    key = cand - f_c * K
    is_bi = key >= V
    last = torch.where(is_bi, (key - V) % V, key)  # firing token
    first = torch.where(is_bi, torch.div(key - V, V, rounding_mode="floor"), -1)
    p = p_uni[last]
    if bool(is_bi.any()):  # p(a, b) = p(b) * pool(a, b) / pool(b)
        bkey = first[is_bi] * V + last[is_bi]
        cnt = _occurrences_of(pool_bi_keys, pool_bi_counts, bkey)
        p[is_bi] = p[is_bi] * cnt.clamp(min=0.5) / pool_uni[last[is_bi]].double().clamp(min=1.0)
    prec = (c_active + 0.5) / (c_any + 1.0)
    # a bigram only earns its place by being more precise than its last token alone (else the unigram,
    # which covers at least as much, is the better keyword)
    uni_of = torch.searchsorted(cand, f_c * K + last)  # [C] the unigram candidate of the same firing token
    allowed = ~is_bi | (prec > prec[uni_of])
    q = (p * (1.0 - prec)).clamp(0.0, 1.0)
    false_alarm = 1.0 - (1.0 - q) ** window  # [C] P(a term hit in a `window`-token window without firing)

    # greedy selection, all features at once
    covered = torch.zeros(ua.numel(), dtype=torch.bool)
    chosen_round = torch.full((C,), -1, dtype=torch.long)
    share_at = torch.zeros(C, dtype=torch.float64)
    no_alarm = torch.ones(R, dtype=torch.float64)
    n_act_c = n_act[f_c].double().clamp(min=1.0)
    idx_c = torch.arange(C)
    for r in range(max_terms):
        unc = ~covered
        marg = (torch.bincount(ui[unc], minlength=C) + torch.bincount(bi[unc & hb], minlength=C)).double()
        share = marg / n_act_c
        gain = share - no_alarm[f_c] * false_alarm
        ok = allowed & (chosen_round < 0) & (marg > 0)
        if r > 0:
            ok &= (share >= min_share) & (gain > 0)
        g = gain.masked_fill(~ok, -math.inf)
        best = torch.full((R,), -math.inf, dtype=torch.float64).scatter_reduce(0, f_c, g, "amax")
        is_best = ok & (g == best[f_c])
        pick = torch.full((R,), C, dtype=torch.long).scatter_reduce(0, f_c[is_best], idx_c[is_best], "amin")
        pick = pick[pick < C]
        if pick.numel() == 0:
            break
        chosen_round[pick] = r
        share_at[pick] = share[pick]
        no_alarm[f_c[pick]] *= 1.0 - false_alarm[pick]
        is_chosen = chosen_round >= 0
        covered |= is_chosen[ui] | (hb & is_chosen[bi])

    # assemble (small per-feature Python work on plain lists)
    sel = (chosen_round >= 0).nonzero().flatten()
    sel = sel[torch.argsort(f_c[sel] * max_terms + chosen_round[sel])]
    seqs = [[a, b] if a >= 0 else [b] for a, b in zip(first[sel].tolist(), last[sel].tolist())]
    texts = decode_many(tok, seqs)
    per_f: dict[int, list[tuple[tuple[int, ...], str, float, float, float]]] = {}
    for fr, s, t, sh, pr, pp in zip(f_c[sel].tolist(), seqs, texts, share_at[sel].tolist(), prec[sel].tolist(),
                                    p[sel].tolist()):
        per_f.setdefault(fr, []).append((tuple(s), t, sh, pr, pp))
    latents = stats.features[rows].tolist()
    n_ctx = keep.sum(1).tolist()
    n_act_l = n_act.tolist()
    aid = artifact_id((stats.meta or {}).get("settings") if isinstance(getattr(stats, "meta", None), dict) else None)
    for fr in range(R):
        items = per_f.get(fr)
        if not items:
            continue  # dead feature: no explanation
        items = _drop_redundant(items)
        est_tpr = min(1.0, sum(it[2] for it in items))
        est_fpr = 1.0 - float(no_alarm[fr])
        meta = {"est_tpr": round(est_tpr, 4), "est_fpr": round(est_fpr, 4),
                "term_share": [round(it[2], 4) for it in items], "term_precision": [round(it[3], 4) for it in items],
                "term_freq": [float(f"{it[4]:.4g}") for it in items], "n_active": n_act_l[fr],
                "n_contexts": n_ctx[fr], "threshold": threshold, "artifact": aid}
        explanations.append(Explanation(feature=int(latents[fr]), text=_describe(items),
                                        terms=[it[0] for it in items], source="offline", meta=meta))
    return explanations


def _occurrences(cand: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """How many of `keys` equal each candidate -> [C] float64."""
    C = cand.numel()
    if keys.numel() == 0:
        return torch.zeros(C, dtype=torch.float64)
    j = torch.searchsorted(cand, keys).clamp(max=C - 1)
    hit = cand[j] == keys
    return torch.bincount(j[hit], minlength=C).double()


def _occurrences_of(keys: torch.Tensor, counts: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """counts[i] where keys[i] == query (keys sorted, unique), else 0 -> [Q] float64."""
    if keys.numel() == 0:
        return torch.zeros(query.numel(), dtype=torch.float64)
    j = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
    return torch.where(keys[j] == query, counts[j], 0).double()


def _background(stats: Any, V: int, background: torch.Tensor | None):
    """(p_uni [V] float64 per-token frequency, pooled bigram keys [B] sorted, their counts [B], pooled
    unigram counts [V]) over the distinct top contexts of every row of `stats`."""
    ctx = stats.top_context.reshape(-1)  # [F * k]
    toks = stats.top_tokens.reshape(ctx.numel(), -1)  # [F * k, T]
    ids, inv = torch.unique(ctx, return_inverse=True)
    first = torch.full((ids.numel(),), ctx.numel(), dtype=torch.long).scatter_reduce(
        0, inv, torch.arange(ctx.numel()), "amin")
    first = first[ids >= 0]
    pool = toks[first]  # [U, T] one copy of each distinct context
    flat = pool[pool >= 0]
    pool_uni = torch.bincount(flat, minlength=V)[:V]
    a, b = pool[:, :-1], pool[:, 1:]
    ok = (a >= 0) & (b >= 0)
    bk, bc = torch.unique(a[ok] * V + b[ok], return_counts=True)
    if background is not None:
        bg = background[:V].double()
    else:
        bg = pool_uni.double()
    p_uni = bg.clamp(min=0.5) / max(float(bg.sum()), 1.0)
    return p_uni, bk, bc, pool_uni


def _drop_redundant(items: list) -> list:
    """Drop a bigram whose last token is also a chosen unigram (the unigram matches everywhere it does),
    crediting its share to the unigram."""
    uni = {it[0][0]: i for i, it in enumerate(items) if len(it[0]) == 1}
    out, extra = [], {}
    for it in items:
        if len(it[0]) > 1 and it[0][-1] in uni:
            extra[it[0][-1]] = extra.get(it[0][-1], 0.0) + it[2]
        else:
            out.append(it)
    return [(it[0], it[1], it[2] + extra.get(it[0][0], 0.0), it[3], it[4]) if len(it[0]) == 1 else it
            for it in out]


def _describe(items: list) -> str:
    """'" Congress", " Senate" (tokens); "the Congress" (bigram)'."""
    uni = [json.dumps(it[1], ensure_ascii=False) for it in items if len(it[0]) == 1]
    multi = [json.dumps(it[1], ensure_ascii=False) for it in items if len(it[0]) > 1]
    parts = []
    if uni:
        parts.append(", ".join(uni) + (" (token)" if len(uni) == 1 else " (tokens)"))
    if multi:
        parts.append(", ".join(multi) + (" (bigram)" if len(multi) == 1 else " (bigrams)"))
    return "; ".join(parts)


# ---------------------------------------------------------------------------- LLM explainer


@dataclass
class OpenAIExplainer:
    """`(prompt) -> answer` through an OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, ...):
    POST {base_url}/chat/completions with the standard library only. base_url usually ends in /v1.
    api_key: sent as a Bearer token when given (local servers usually need none)."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 256
    system: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not re.match(r"https?://", self.base_url):
            raise InputError(f"base_url must be an http(s) URL such as 'http://localhost:8000/v1', got "
                             f"{self.base_url!r}.")
        if not isinstance(self.model, str) or not self.model:
            raise InputError("model must name the model the server serves (e.g. 'gpt-4o-mini').")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise InputError(f"timeout must be a positive number of seconds, got {self.timeout!r}.")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def __call__(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}]
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            hint = {401: "check api_key", 403: "check api_key", 404: "check base_url (it usually ends in /v1) "
                    "and the model name", 429: "the server is rate-limiting; retry later"}.get(e.code, "check the "
                                                                                                 "server's log")
            raise ExplainerError(f"{self.url} answered HTTP {e.code} ({detail!r}); {hint}.") from None
        except TimeoutError:
            raise ExplainerError(f"{self.url} gave no answer within {self.timeout} s; raise timeout=... or use a "
                                 "faster model.") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise ExplainerError(f"{self.url} gave no answer within {self.timeout} s; raise timeout=... or "
                                     "use a faster model.") from None
            raise ExplainerError(f"Cannot reach {self.url} ({e.reason}); is the server running and base_url "
                                 "right?") from None
        except OSError as e:
            raise ExplainerError(f"Connection to {self.url} failed ({e}); is the server running?") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise ExplainerError(f"{self.url} did not answer an OpenAI chat completion (got {raw[:200]!r}); "
                                 "point base_url at an OpenAI-compatible /v1 endpoint.") from None
        if not isinstance(content, str) or not content.strip():
            raise ExplainerError(f"{self.url} (model {self.model!r}) gave an empty answer; try another model or "
                                 "a larger max_tokens.")
        return content


def call_explainer(explainer: Callable[[str], str], prompt: str, what: str) -> str:
    """Run a user explainer (prompt -> answer) on `what` (e.g. 'feature 12'); every failure, or an answer that
    is not a str, becomes an ExplainerError that says which call failed."""
    try:
        out = explainer(prompt)
    except ExplainerError:
        raise
    except Exception as e:  # a user callable: any failure is the explainer's
        raise ExplainerError(f"The explainer failed on {what}: {type(e).__name__}: {e}") from e
    if not isinstance(out, str):
        raise ExplainerError(f"The explainer returned {type(out).__name__} on {what}; it must return a str.")
    return out


def _clean_answer(ans: str) -> str:
    """First non-empty line, without a leading 'Explanation:' label or surrounding quotes."""
    for line in ans.strip().splitlines():
        line = re.sub(r"^\s*(\**\s*)?(explanation|answer)\s*:\s*(\**\s*)?", "", line.strip(), flags=re.I).strip()
        line = line.strip("\"'`* ").strip()
        if line:
            return line
    return ""


def _render(pieces: list[str], marked: list[bool]) -> str:
    return "".join(f"<<{s}>>" if m and s else s for s, m in zip(pieces, marked)).replace("\n", "\\n")


EXPLAIN_PROMPT = (
    "We are studying a feature of a neural network language model. Below are text excerpts where the feature "
    "is active; the tokens where it is most active are marked <<like this>>.\n\n{examples}\n\n"
    "What does the feature detect? Reply with a short explanation (at most 15 words), nothing else."
)


def explain_llm(
    stats: Any,
    tokenizer: Any,
    explainer: Callable[[str], str],
    *,
    features: Any = None,
    n_examples: int = 10,
    threshold: float = 0.5,
    progress: bool = False,
) -> list[Explanation]:
    """Ask `explainer` (any `(prompt) -> str`, e.g. OpenAIExplainer) to explain each feature from its top
    `n_examples` distinct contexts, with tokens at >= `threshold` x the context's max marked <<so>>.
    The explanation is the answer's first non-empty line. Dead features are skipped (no explanation).
    Any failure (HTTP error, timeout, empty answer, the callable raising) raises ExplainerError.
    LLM explanations have terms = []: score them with detection.LLMDetector."""
    _check_stats(stats)
    if not callable(explainer):
        raise InputError(f"explainer must be a callable (prompt: str) -> str or an OpenAIExplainer, got "
                         f"{type(explainer).__name__}.")
    tok = as_tokenizer(tokenizer)
    _check_int("n_examples", n_examples, 1)
    _check_float("threshold", threshold, 0.0, 1.0)
    rows = _rows(stats, features)
    tokens, acts, ctx = stats.top_tokens[rows], stats.top_acts[rows], stats.top_context[rows]
    keep, valid, active = _active_mask(tokens, acts, ctx, threshold)
    live = (active.flatten(1).any(1)).nonzero().flatten().tolist()
    aid = artifact_id((stats.meta or {}).get("settings") if isinstance(getattr(stats, "meta", None), dict) else None)
    name = getattr(explainer, "model", None) or getattr(explainer, "__name__", type(explainer).__name__)
    it: Iterable[int] = live
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(live, unit="feature", desc="explaining")
    out = []
    for r in it:
        js = keep[r].nonzero().flatten()[:n_examples].tolist()
        blocks = []
        for n, j in enumerate(js, 1):
            v = valid[r, j]
            ids = tokens[r, j][v].tolist()
            pieces = decode_many(tok, [[i] for i in ids])
            blocks.append(f"Example {n}: " + _render(pieces, active[r, j][v].tolist()))
        latent = int(stats.features[rows[r]])
        prompt = EXPLAIN_PROMPT.format(examples="\n".join(blocks))
        text = _clean_answer(call_explainer(explainer, prompt, f"feature {latent}"))
        if not text:
            raise ExplainerError(f"The explainer gave an empty explanation for feature {latent}; check the model "
                                 "and its settings (e.g. max_tokens).")
        out.append(Explanation(feature=latent, text=text, terms=[], source="llm",
                               meta={"n_examples": len(js), "explainer": str(name), "artifact": aid}))
    return out

