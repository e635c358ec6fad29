"""Head detectors: which attention heads attend (or write) in a known way, as [layer, head] scores.

    scores = head_scores(model, "induction")          # [n_layers, n_heads] on BOS + r + r
    found = detect_heads(model, tokens, kinds=("previous_token", "bos"))  # one forward, several kinds

Attention kinds score a head by where its attention goes, against a target mask M[b, q, k]
(which keys a query "should" attend to) built from the tokens:

    score[l, h] = mean over eligible queries (b, q) of  sum_k A[l, b, h, q, k] * M[b, q, k]

A query is eligible if it is a real (not padded) token with at least one target key; 1.0 is a
head that puts all its attention on the targets. This is TransformerLens' head_detector "mul"
measure, except that TL divides by every query position (so a perfect induction head scores
about 0.5 on BOS + r + r there) and compares one sequence at a time.

- previous_token: the key at q - 1.
- duplicate_token: earlier keys holding the same token as the query (k < q, t_k = t_q).
- induction: keys right after an earlier occurrence of the query's token (k - 1 < q, t_{k-1} = t_q);
  general for any tokens, not only the r + r layout.
- bos: the first real position of the row (the BOS when there is one; the attention sink
  otherwise). The first real query is skipped: it can only attend to itself.
- a tensor [T, T] or [B, T, T]: your own target mask (weights), TL's custom detection pattern.

copy_suppression scores what a head writes instead (negative / copy-suppression heads, McDougall
et al. 2023): the direct effect of its output, through each attended key's value vector, on the
logit of the very token it attends to, negated and weighted by attention:

    cs[l, h] = -mean over eligible (b, q) of sum_k A[l,b,h,q,k] * (v[b,k,h] W_O[l,h]) . u(t_k) / s[b,q]

with u(t) = W_U[:, t] times the final norm's weight (centred for LayerNorm) and s the final
norm's scale at q, i.e. logit units of the direct path. Keys are real non-BOS tokens; eligible
queries are those with such a key. Positive: the head lowers the logits of the tokens it attends
to (GPT-2 small's L10H7); negative: a copying head (induction heads copy, so score negative).

Only the hook points needed run hooked (patterns, and for copy_suppression the values and the
final norm's scale); each layer's pattern is reduced to [B, H, T] inside its hook, so memory stays
O(B H T) per layer instead of caching O(L B H T^2) patterns.
Shapes: L layers, B sequences, H query heads (GQA patterns are per query head), T positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mechscope.circuits.tasks import repeated_random_tokens
from mechscope.errors import InputError

ATTENTION_KINDS = ("previous_token", "duplicate_token", "induction", "bos")
KINDS = (*ATTENTION_KINDS, "copy_suppression")
DEFAULT_KINDS = KINDS


def head_scores(model: Any, kind: str | torch.Tensor, tokens: torch.Tensor | str | Sequence[str] | None = None, *,
                seq_len: int = 50, n_seqs: int = 32, seed: int = 0, prepend_bos: bool | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Score every head for one kind (see the module docstring): [n_layers, n_heads] float32.

    tokens: token ids [B, T] (or [T]), text, or None for n_seqs sequences BOS + r + r with
    seq_len distinct random ordinary tokens in r (BOS when the tokenizer has one, or as
    prepend_bos says). attention_mask [B, T] marks real tokens; padded queries and keys are
    ignored. kind may also be a target mask [T, T] or [B, T, T] (then tokens are required).
    """
    if isinstance(kind, torch.Tensor):
        if tokens is None:
            raise InputError("A custom target mask needs the tokens it was built for (tokens=).")
        return detect_heads(model, tokens, kinds=(), patterns={"custom": kind}, attention_mask=attention_mask,
                            prepend_bos=prepend_bos)["custom"]
    return detect_heads(model, tokens, kinds=(kind,), seq_len=seq_len, n_seqs=n_seqs, seed=seed,
                        prepend_bos=prepend_bos, attention_mask=attention_mask)[kind]


@torch.no_grad()
def detect_heads(model: Any, tokens: torch.Tensor | str | Sequence[str] | None = None,
                 kinds: Sequence[str] = DEFAULT_KINDS, *, patterns: Mapping[str, torch.Tensor] | None = None,
                 seq_len: int = 50, n_seqs: int = 32, seed: int = 0, prepend_bos: bool | None = None,
                 attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Several kinds from ONE forward pass: {kind: [n_layers, n_heads]}. patterns adds named
    custom target masks ([T, T] or [B, T, T]). Arguments as in head_scores."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    for k in kinds:
        if k not in KINDS:
            raise InputError(f"Unknown head kind {k!r}; kinds: {', '.join(KINDS)} (or pass a target mask tensor).")
    patterns = dict(patterns or {})
    clash = set(patterns) & set(kinds)
    if clash:
        raise InputError(f"Custom pattern names {sorted(clash)} clash with built-in kinds; rename them.")
    if not kinds and not patterns:
        raise InputError("Nothing to detect: pass kinds and/or patterns.")
    toks, real = _inputs(model, tokens, attention_mask, seq_len, n_seqs, seed, prepend_bos)  # [B, T] each
    B, T = toks.shape
    targets = {k: target_mask(k, toks, real) for k in kinds if k in ATTENTION_KINDS}  # [B, T, T] float
    for name, m in patterns.items():
        targets[name] = _custom(name, m, toks, real)
    eligible = {}
    for name, m in targets.items():
        eligible[name] = real & (m != 0).any(-1)  # [B, T]
        if not bool(eligible[name].any()):
            raise InputError(_too_short(name, T))

    c = model.cfg
    L = c.n_layers
    mass: dict[str, list[torch.Tensor | None]] = {name: [None] * L for name in targets}
    hooks: list[tuple[str, Any]] = []
    cs = "copy_suppression" in kinds
    if cs:
        cs_state = _CopySuppression(model, toks, real)
        eligible["copy_suppression"] = cs_state.eligible
        if not bool(cs_state.eligible.any()):
            raise InputError(_too_short("copy_suppression", T))
        hooks += cs_state.hooks()

    def on_pattern(pattern: torch.Tensor, hook: Any) -> None:  # [B, H, T, T]
        layer = int(hook.name.split(".")[1])
        p = pattern.float()
        for name, m in targets.items():
            mass[name][layer] = torch.einsum("bhqk,bqk->bhq", p, m)  # attention on targets, [B, H, T]
        if cs:
            cs_state.on_pattern(layer, p)

    hooks.append((lambda n: n.startswith("blocks.") and n.endswith(".attn.hook_pattern"), on_pattern))
    model.run_with_hooks(toks, return_type=None, attention_mask=None if bool(real.all()) else real.long(),
                         fwd_hooks=hooks)
    out = {}
    for name in targets:
        stacked = torch.stack(mass[name])  # [L, B, H, T]
        out[name] = _mean_over(stacked, eligible[name])
    if cs:
        out["copy_suppression"] = _mean_over(cs_state.scores(), eligible["copy_suppression"])
    return {k: out[k] for k in (*kinds, *patterns)}


def _mean_over(x: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """[L, B, H, T] -> [L, H]: the mean over the eligible (b, q) pairs."""
    w = eligible.to(x.dtype)[None, :, None, :]  # [1, B, 1, T]
    return (x * w).sum(dim=(1, 3)) / eligible.sum()


def _too_short(kind: str, T: int) -> str:
    hint = {"duplicate_token": "no token repeats in the tokens",
            "induction": "no token repeats before the last position",
            "previous_token": "sequences need at least 2 real tokens",
            "bos": "sequences need at least 2 real tokens",
            "copy_suppression": "no query has a real non-BOS key to attend to"}.get(kind, "the target mask is all zero")
    return (f"Cannot score {kind!r} on these tokens ({T} positions): {hint}. Pass longer tokens or tokens=None "
            "(repeated random tokens).")


# ------------------------------------------------------------------------------ inputs and targets


def _inputs(model: Any, tokens: Any, attention_mask: torch.Tensor | None, seq_len: int, n_seqs: int, seed: int,
            prepend_bos: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B, T] on the model's device, real-token mask [B, T] bool)."""
    if tokens is None:
        if attention_mask is not None:
            raise InputError("attention_mask without tokens: the generated sequences have no padding.")
        toks = repeated_random_tokens(model, n_seqs, seq_len, seed=seed, prepend_bos=prepend_bos)
        return toks, torch.ones_like(toks, dtype=torch.bool)
    if isinstance(tokens, str) or (isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str)):
        if attention_mask is not None:
            raise InputError("With text input the attention mask comes from the tokenizer; drop attention_mask.")
        toks, mask = model.to_tokens(tokens, prepend_bos=prepend_bos, return_mask=True)
        return toks, mask.bool()
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise InputError(f"tokens must be an integer tensor [batch, pos], text, or None; got "
                         f"{type(tokens).__name__} {getattr(tokens, 'dtype', '')}.")
    toks = tokens[None] if tokens.dim() == 1 else tokens
    if toks.dim() != 2 or toks.numel() == 0:
        raise InputError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}.")
    toks = toks.to(model.device, torch.long)
    if attention_mask is None:
        return toks, torch.ones_like(toks, dtype=torch.bool)
    mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
    if tuple(mask.shape) != tuple(toks.shape):
        raise InputError(f"attention_mask must have the tokens' shape {tuple(toks.shape)}, got {tuple(mask.shape)}.")
    if ((mask != 0) & (mask != 1)).any():
        raise InputError("attention_mask must hold only 0 and 1.")
    return toks, mask.to(model.device).bool()


def target_mask(kind: str, tokens: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """The target mask of an attention kind: [B, T, T] float, M[b, q, k] = 1 where query q
    "should" attend to key k. Padded queries and keys (real = False) get no targets."""
    B, T = tokens.shape
    real = torch.ones_like(tokens, dtype=torch.bool) if real is None else real
    dev = tokens.device
    q = torch.arange(T, device=dev)[:, None]
    k = torch.arange(T, device=dev)[None, :]
    both = real[:, :, None] & real[:, None, :]  # [B, T, T] real query and real key
    if kind == "previous_token":
        m = (k == q - 1)[None] & both
    elif kind == "duplicate_token":
        m = (tokens[:, :, None] == tokens[:, None, :]) & (k < q)[None] & both
    elif kind == "induction":
        prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)  # t_{k-1}, [B, T]
        prev_real = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
        m = (tokens[:, :, None] == prev[:, None, :]) & (k - 1 < q)[None] & both & prev_real[:, None, :]
    elif kind == "bos":
        first = real.float().argmax(-1)  # [B] first real position
        m = (k == first[:, None, None]) & (q != first[:, None, None]) & both
    else:
        raise InputError(f"Unknown attention kind {kind!r}; kinds: {', '.join(ATTENTION_KINDS)}.")
    return m.float()


def _custom(name: str, m: Any, toks: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    B, T = toks.shape
    if not isinstance(m, torch.Tensor) or m.dim() not in (2, 3) or tuple(m.shape[-2:]) != (T, T) or (
            m.dim() == 3 and m.shape[0] not in (1, B)):
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise InputError(f"Target mask {name!r} must have shape [T, T] or [B, T, T] with B={B}, T={T}; got {shape}.")
    m = m.to(toks.device, torch.float32).expand(B, T, T)
    return m * (real[:, :, None] & real[:, None, :])


# ------------------------------------------------------------------------------ copy suppression


class _CopySuppression:
    """Collects, per layer, the attention-weighted direct logit effect of each head on the tokens
    it attends to (see the module docstring); hooks hook_v, hook_pattern and ln_final's scale."""

    def __init__(self, model: Any, toks: torch.Tensor, real: torch.Tensor) -> None:
        c = model.cfg
        if not c.causal or not c.has_unembed or c.post_attn_norm or c.post_layernorm:
            raise InputError("copy_suppression needs a causal pre-norm language model whose head outputs add "
                             "straight to the residual stream (no post-attention norm) and an unembedding.")
        self.model, self.c = model, c
        bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
        key_ok = real & (toks != bos) if bos is not None else real.clone()  # [B, T] keys that count
        self.key_ok = key_ok
        T = toks.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=toks.device).tril()
        self.eligible = real & (causal[None] & key_ok[:, None, :]).any(-1)  # [B, T]
        u = model.unembed.weight.detach()[toks].float()  # [B, T, D] unembedding row of each token
        if c.final_norm:
            w = model.ln_final.w
            if w is not None:
                u = u * w.detach().float()
            if c.normalization == "LN":  # LayerNorm centres its input: only the centred part counts
                u = u - u.mean(-1, keepdim=True)
        self.u = u
        self.v: dict[int, torch.Tensor] = {}
        self.acc: list[torch.Tensor | None] = [None] * c.n_layers  # [B, H, T] per layer
        self.scale: torch.Tensor | None = None

    def hooks(self) -> list[tuple[Any, Any]]:
        def on_v(v: torch.Tensor, hook: Any) -> None:  # [B, T, K, E]
            self.v[int(hook.name.split(".")[1])] = v.float()

        def on_scale(s: torch.Tensor, hook: Any) -> None:  # [B, T, 1]
            self.scale = s.float()[..., 0]

        hooks: list[tuple[Any, Any]] = [(lambda n: n.startswith("blocks.") and n.endswith(".attn.hook_v"), on_v)]
        if self.c.final_norm:
            hooks.append(("ln_final.hook_scale", on_scale))
        return hooks

    def on_pattern(self, layer: int, pattern: torch.Tensor) -> None:  # [B, H, T, T]
        c = self.c
        v = self.v.pop(layer).repeat_interleave(c.n_heads // c.n_kv_heads, dim=2)  # [B, T, H, E] per query head
        w_o = self.model.blocks[layer].attn.W_O.detach().float()  # [H, E, D]
        ou = torch.einsum("hed,bkd->bkhe", w_o, self.u)  # W_O[h] u(t_k): [B, T, H, E]
        dla = (v * ou).sum(-1) * self.key_ok[..., None]  # [B, T(key), H] logit of t_k from head h's value at k
        self.acc[layer] = torch.einsum("bhqk,bkh->bhq", pattern, dla)

    def scores(self) -> torch.Tensor:  # [L, B, H, T]
        stacked = torch.stack(self.acc)
        if self.scale is not None:
            stacked = stacked / self.scale[None, :, None, :]
        return -stacked
