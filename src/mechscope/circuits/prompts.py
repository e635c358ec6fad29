"""Clean / corrupted prompt pairs for patching and attribution: tokenized together, checked to line up.

Patching compares two runs position by position, so a pair must have the same number of tokens (or have its
ends aligned by left padding, align_prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mechscope.errors import InputError, PromptMismatchError
from mechscope.models.transformer import HookedTransformer

Prompts = str | Sequence[str] | torch.Tensor


def align_prompts(model: HookedTransformer, clean: Sequence[str], corrupted: Sequence[str],
                  prepend_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize clean/corrupted pairs of different token lengths so their ENDS line up: every prompt is
    left-padded to the longest one. Returns (clean_tokens, corrupted_tokens, clean_mask, corrupted_mask),
    each [B, T]; pass the masks as `attention_mask=(clean_mask, corrupted_mask)`.

    Why left: the metric is usually read at the last token and the answer-relevant tokens sit near the
    end. Positions are then "from the end": patching position t of a row whose clean prompt has padding
    at t writes a padding activation into the corrupted run, so read results at padded positions with care."""
    if isinstance(clean, str) or isinstance(corrupted, str) or len(clean) != len(corrupted):
        raise PromptMismatchError("align_prompts takes two lists of prompts of the same length (one pair per row).")
    toks, mask = model.to_tokens(list(clean) + list(corrupted), prepend_bos=prepend_bos, padding_side="left",
                                 return_mask=True)
    B = len(clean)
    return toks[:B], toks[B:], mask[:B], mask[B:]


def tokenize_pair(model: HookedTransformer, clean: Prompts, corrupted: Prompts, attention_mask: Any,
                   prepend_bos: bool | None):
    """Text or token-id pairs -> clean tokens, corrupted tokens [B, T], clean mask, corrupted mask ([B, T] or
    None); text is left-padded, pairs of different token counts are refused with PromptMismatchError."""
    texts = [isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], str))
             for x in (clean, corrupted)]
    if any(texts) and not all(texts):
        raise InputError("Pass clean and corrupted both as text or both as token ids.")
    if all(texts):
        c = [clean] if isinstance(clean, str) else list(clean)
        k = [corrupted] if isinstance(corrupted, str) else list(corrupted)
        if len(c) != len(k):
            raise PromptMismatchError(f"{len(c)} clean prompts but {len(k)} corrupted ones: give one corrupted "
                                      "prompt per clean prompt.")
        if attention_mask is not None:
            raise InputError("attention_mask is only for token-id inputs; text is padded (left) automatically.")
        toks, mask = model.to_tokens(c + k, prepend_bos=prepend_bos, padding_side="left", return_mask=True)
        B = len(c)
        lc, lk = mask[:B].sum(-1).tolist(), mask[B:].sum(-1).tolist()
        bad = [i for i in range(B) if lc[i] != lk[i]]
        if bad:
            i = bad[0]
            raise PromptMismatchError(
                f"Clean and corrupted prompts must have the same number of tokens (patching compares them position "
                f"by position); pair {i} has {lc[i]} vs {lk[i]} tokens: {model.to_str_tokens(c[i], prepend_bos)} vs "
                f"{model.to_str_tokens(k[i], prepend_bos)} ({len(bad)} of {B} pairs differ). Choose corrupted words "
                "with the same token count (e.g. other single-token names), or align the ends with "
                "mechscope.circuits.patching.align_prompts(model, clean, corrupted) and pass its masks as "
                "attention_mask=(clean_mask, corrupted_mask).")
        return toks[:B], toks[B:], mask[:B], mask[B:]
    if not isinstance(clean, torch.Tensor) or not isinstance(corrupted, torch.Tensor):
        raise InputError("clean and corrupted must be text, lists of text or token ids [batch, pos].")
    c = clean[None] if clean.dim() == 1 else clean
    k = corrupted[None] if corrupted.dim() == 1 else corrupted
    if c.shape != k.shape:
        raise PromptMismatchError(
            f"clean tokens {tuple(c.shape)} and corrupted tokens {tuple(k.shape)} differ in shape; patching needs "
            "one corrupted prompt per clean prompt with the same number of tokens. For text pairs of different "
            "lengths use mechscope.circuits.patching.align_prompts and pass attention_mask=(clean_mask, "
            "corrupted_mask).")
    mc, mk = attention_mask if isinstance(attention_mask, (tuple, list)) else (attention_mask, attention_mask)
    return c, k, mc, mk


__all__ = ["Prompts", "align_prompts", "tokenize_pair"]
