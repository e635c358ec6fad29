"""Ask questions of a sparse coder's features: which fire on this prompt, which are about this word,
which look like this one.

    fa = active_features(model, coder, "The cat sat on the mat")   # per token: the top features firing
    print(fa)                                                       #   ' cat'   f812=4.31, f77=1.02
    search_features(stats, model.tokenizer, " cat")                 # [(812, 0.91), ...] from FeatureStats
    nearest_features(coder, 812)                                    # [(3301, 0.64), ...] by decoder cosine

`active_features` runs one forward (stopped after the coder's layer) and encodes it with the same code
path as `feature_stats`, so a value here is the value a dashboard shows for that token. `search_features`
needs no model: it reads the top contexts already stored in a `FeatureStats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.data.packing import as_tokenizer, make_encoder, tokenizer_fingerprint
from mechscope.errors import ArtifactMismatchError, ContextLengthError, InputError
from mechscope.features.stats import FeatureStats, check_coder, latent_acts_fn, without_token

__all__ = ["FeatureActivations", "active_features", "nearest_features", "search_features"]


@dataclass
class FeatureActivations:
    """The strongest `top_n` features on each token of one prompt (what `active_features` returns)."""

    tokens: list[str]  # [T] decoded text of each token
    token_ids: torch.Tensor  # [T] long
    values: torch.Tensor  # [T, top_n] float32, descending; 0 where fewer features fired
    indices: torch.Tensor  # [T, top_n] long latent index; -1 where fewer features fired
    n_active: torch.Tensor  # [T] long: how many features fired on the token (may exceed top_n)

    def __len__(self) -> int:
        return len(self.tokens)

    def features_at(self, pos: int) -> list[tuple[int, float]]:
        """[(latent, activation)] firing at position `pos` (strongest first, at most top_n)."""
        keep = self.indices[pos] >= 0
        return list(zip(self.indices[pos][keep].tolist(), self.values[pos][keep].tolist(), strict=True))

    def table(self) -> str:
        """One line per token: position, the token (repr, so spaces and newlines show), the features."""
        width = min(max((len(repr(t)) for t in self.tokens), default=0), 24)
        lines = []
        for i, tok in enumerate(self.tokens):
            feats = ", ".join(f"f{f}={v:.3g}" for f, v in self.features_at(i))
            more = int(self.n_active[i]) - (self.indices[i] >= 0).sum().item()
            if more > 0:
                feats += f" (+{more} more)"
            lines.append(f"{i:>4}  {repr(tok):<{width}}  {feats or '-'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def active_features(model, coder, prompt: str | torch.Tensor, *, top_n: int = 5, prepend_bos: bool = True,
                    exclude_bos: bool = True) -> FeatureActivations:
    """Which features fire on each token of `prompt` (text, or token ids [T] / [1, T]), strongest first.

    prepend_bos: put BOS in front of text (the contexts `feature_stats` sees all start with BOS, so
    activations are comparable to a dashboard's). exclude_bos: report nothing on BOS positions, as
    `feature_stats` does (the BOS residual is the same in every context and is not about the text)."""
    if not isinstance(top_n, int) or top_n < 1:
        raise InputError(f"top_n must be an int >= 1, got {top_n!r}.")
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("Empty prompt: pass some text (or token ids) to look at.")
        tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)[0]  # [T]
    elif isinstance(prompt, torch.Tensor):
        tokens = prompt[0] if prompt.dim() == 2 and prompt.shape[0] == 1 else prompt
        if tokens.dim() != 1:
            raise InputError(f"Token ids must have shape [T] or [1, T] (one prompt), got {tuple(prompt.shape)}.")
        if tokens.numel() == 0:
            raise InputError("Empty prompt: the token tensor has no positions.")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise InputError(f"Token ids must be an integer tensor, got dtype {tokens.dtype}.")
    else:
        raise InputError(f"prompt must be text or a tensor of token ids, got {type(prompt).__name__}.")
    T = tokens.shape[0]
    if T > model.cfg.n_ctx:
        # rotary models would run, but past n_ctx they never trained and the features mean nothing there
        raise ContextLengthError(f"The prompt is {T} tokens, longer than the model's context of {model.cfg.n_ctx}; "
                                 "shorten it or split it into pieces.")
    hook, stop = check_coder(model, coder, None)
    run = latent_acts_fn(model, coder, hook, stop, None)
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    if exclude_bos and bos is not None:
        run = without_token(run, int(bos))
    with torch.no_grad():
        acts = run(tokens[None].long())[0]  # [T, n]  (the forward validates the id range)
    n = min(top_n, acts.shape[-1])
    values, indices = acts.topk(n, dim=-1)  # [T, n] descending
    off = values <= 0
    ids = tokens.cpu().long()
    if model.tokenizer is not None:
        strs = [model.tokenizer.decode([t]) for t in ids.tolist()]
    else:
        strs = [str(t) for t in ids.tolist()]
    return FeatureActivations(tokens=strs, token_ids=ids, values=values.masked_fill(off, 0.0),
                              indices=indices.masked_fill(off, -1), n_active=(acts > 0).sum(-1))


def _query_ids(tok, query: str, match_space: bool) -> list[list[int]]:
    """Token ids (no special tokens) of the query and, with match_space, of ' ' + query: mid-sentence
    words are tokenized with their leading space by BPE tokenizers, and users rarely type it."""
    if not isinstance(query, str) or not query.strip():
        raise InputError("The query must be a non-empty string (a word or a phrase).")
    texts = [query]
    if match_space and not query[0].isspace():
        texts.append(" " + query)
    enc = make_encoder(tok)(texts)
    bos = getattr(tok, "bos_token_id", None)
    out: list[list[int]] = []
    for ids in enc:
        ids = list(ids)
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        if ids and ids not in out:
            out.append(ids)
    if not out:
        raise InputError(f"The query {query!r} gave no tokens.")
    return out


def _phrase_mask(top_tokens: torch.Tensor, q: list[int]) -> torch.Tensor:
    """top_tokens [F, k, T] -> bool [F, k, T]: True at the LAST token of each occurrence of phrase q."""
    L, T = len(q), top_tokens.shape[-1]
    mask = torch.zeros(top_tokens.shape, dtype=torch.bool)
    if L > T:
        return mask
    m = top_tokens[..., L - 1 :] == q[-1]  # [F, k, T - L + 1]
    for j in range(L - 1):  # the phrase's earlier tokens, shifted into place (L is a few tokens)
        m &= top_tokens[..., j : T - L + 1 + j] == q[j]
    mask[..., L - 1 :] = m
    return mask


def search_features(stats: FeatureStats, tokenizer, query: str, *, top_n: int = 10,
                    match_space: bool = True) -> list[tuple[int, float]]:
    """Features about a word or phrase: [(latent, score)], best first, score > 0 only.

    score = the share of the feature's activation mass over its stored top contexts that sits on the
    last token of an occurrence of `query` (the earlier tokens of a phrase must precede it). 1.0: the
    feature's strongest examples fire on the query and nowhere else. `tokenizer`: the one the stats were
    made with (or a model holding it). match_space: also match ' ' + query (how a word mid-sentence
    is tokenized)."""
    if not isinstance(top_n, int) or top_n < 1:
        raise InputError(f"top_n must be an int >= 1, got {top_n!r}.")
    tok = as_tokenizer(tokenizer)
    want = (stats.meta.get("settings") or {}).get("stream", {}).get("tokenizer", {}).get("fingerprint")
    if want is not None and want != tokenizer_fingerprint(tok):
        raise ArtifactMismatchError("These feature stats were made with another tokenizer (vocabulary fingerprint "
                                    "differs); pass the tokenizer of the model the stats came from.")
    variants = _query_ids(tok, query, match_space)
    top_tokens = stats.top_tokens.cpu()  # [F, k, T]
    acts = stats.top_acts.cpu().float().clamp(min=0)  # [F, k, T]
    hit = torch.zeros(top_tokens.shape, dtype=torch.bool)
    for q in variants:
        hit |= _phrase_mask(top_tokens, q)
    total = acts.sum((1, 2), dtype=torch.float64)  # [F]
    on = (acts * hit).sum((1, 2), dtype=torch.float64)  # [F]
    score = torch.where(total > 0, on / total.clamp(min=1e-30), torch.zeros_like(total))  # [F]
    # best score first; ties broken by more matched mass, then by lower latent (stable sorts)
    order = torch.sort(on, descending=True, stable=True).indices
    order = order[torch.sort(score[order], descending=True, stable=True).indices]
    order = order[score[order] > 0][:top_n]
    latents = stats.features.cpu()[order]
    return list(zip(latents.tolist(), score[order].tolist(), strict=True))


def nearest_features(coder, latent: int, *, top_n: int = 10, space: str = "decoder") -> list[tuple[int, float]]:
    """The features whose directions are closest to `latent`'s: [(latent, cosine)], highest first, itself
    excluded. space="decoder": decoder rows (what the feature writes; near-duplicates and split features
    show up here); "encoder": encoder columns (what it reads)."""
    n = coder.cfg.n_latents
    if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < n:
        raise InputError(f"latent must be an int in [0, {n}), got {latent!r}.")
    if not isinstance(top_n, int) or top_n < 1:
        raise InputError(f"top_n must be an int >= 1, got {top_n!r}.")
    if space == "decoder":
        w = coder.W_dec.detach().float()  # [n, d_out]
    elif space == "encoder":
        w = coder.W_enc.detach().float().T  # [n, d_in]
    else:
        raise InputError(f"space must be 'decoder' or 'encoder', got {space!r}.")
    w = torch.nn.functional.normalize(w, dim=-1)  # zero rows stay zero (cosine 0)
    cos = (w @ w[latent]).cpu()  # [n]
    cos[latent] = -float("inf")
    k = min(top_n, n - 1)
    v, i = cos.topk(k)
    return list(zip(i.tolist(), v.tolist(), strict=True))
