"""The activations a probe reads: one row per text (position "last" or "mean") or per token ("all").

    feats = collect(model, texts, ["blocks.3.hook_resid_post", "blocks.4.hook_resid_post"], "last")
    feats.rows["blocks.3.hook_resid_post"]   # [n_texts, d] float32 on the CPU
    feats.text_of                            # None, or [n_tokens] the text of each row for "all"

Every hook of the list is read in the same forward pass per batch (run_with_cache with a names filter,
stopped after the last layer asked for), so a layer sweep costs one forward per batch, not one per layer.

Which tokens count: padding never; the prepended BOS token never for "mean" and "all" (it is an attention
sink with the same, huge activation in every text, which would only add a length-dependent constant).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from mechscope.errors import InputError, NonFiniteError

Position = Literal["last", "mean", "all"]
POSITIONS = ("last", "mean", "all")


class Features(NamedTuple):
    rows: dict[str, torch.Tensor]  # hook -> [N, d] float32, CPU
    text_of: torch.Tensor | None  # [N] long: the text of each row (position "all"), else None (row i = text i)


def check_position(position: str) -> None:
    if position not in POSITIONS:
        raise InputError(f"Unknown probe position {position!r}; use 'last' (the last token), 'mean' (mean over "
                         "the text's tokens) or 'all' (every token a row).")


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise InputError("Give a list of texts (one example each), not a single string.")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError("texts must be a non-empty list of strings.")
    return texts


def _real_positions(model, tokens: torch.Tensor, mask: torch.Tensor | None, skip_bos: bool) -> torch.Tensor:
    """[B, T] bool: the positions a probe reads (real tokens, minus the prepended BOS when skip_bos)."""
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    bos = getattr(model.tokenizer, "bos_token_id", None)
    if skip_bos and bos is not None:
        first = real.clone()
        first[:, 1:] = False  # right padding: position 0 is the first real token
        is_bos = first & (tokens == bos)
        if bool(((real & ~is_bos).sum(1) == 0).any()):
            raise InputError("A text has no token besides BOS; give non-empty texts.")
        real = real & ~is_bos
    return real


def collect(model, texts: Sequence[str], hooks: Sequence[str], position: Position = "last", batch_size: int = 32,
            progress: bool = False) -> Features:
    """Activations of `hooks` for `texts` at `position` (see the module docstring)."""
    check_position(position)
    texts = check_texts(texts)
    hooks = list(hooks)
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}.")
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    groups: list[torch.Tensor] = []
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="probe activations", unit="batch")
    with torch.no_grad():
        for s in starts:
            batch = texts[s:s + batch_size]
            tokens, mask = model.prepare(batch, padding_side="right")
            model.check_context(tokens.shape[1])
            _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=hooks, return_type=None)
            real = _real_positions(model, tokens, mask, skip_bos=position != "last")
            for h in hooks:
                a = cache[h]
                if a.dim() < 3 or a.shape[:2] != tokens.shape:
                    raise InputError(f"Hook {h} has shape {tuple(a.shape)}, not [batch, pos, ...]: probes read "
                                     "position-wise hooks (resid, attn_out, mlp_out, hook_z, ...).")
                a = a.reshape(*tokens.shape, -1).float()
                if position == "last":
                    last = real.long().cumsum(1).argmax(1)  # the last real position of each row
                    rows = a[torch.arange(len(batch)), last]
                elif position == "mean":
                    w = real.float()[..., None]
                    rows = (a * w).sum(1) / w.sum(1)
                else:
                    rows = a[real]
                if not bool(torch.isfinite(rows).all()):
                    raise NonFiniteError(f"NaN or inf in the activations of {h}; check the model's dtype (fp16 "
                                         "overflow? load it in float32) and any hooks or interventions active.")
                parts[h].append(rows.cpu())
            if position == "all":
                groups.append((torch.arange(len(batch), device=real.device)[:, None] + s).expand_as(real)[real].cpu())
    rows = {h: torch.cat(v) for h, v in parts.items()}
    return Features(rows, torch.cat(groups) if position == "all" else None)


def check_labels(labels, n: int, what: str = "texts") -> torch.Tensor:
    """0/1 labels as a LongTensor [n], or InputError saying what is wrong and how to fix it."""
    try:
        y = torch.as_tensor(labels).detach().reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"labels must be a list or tensor of 0/1 values ({e}).") from e
    if y.numel() != n:
        raise InputError(f"{y.numel()} labels for {n} {what}; give exactly one 0/1 label per example.")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise InputError("labels contain NaN or inf; give 0/1 labels.")
    if not bool(((y == 0) | (y == 1)).all()):
        bad = sorted({float(v) for v in y[(y != 0) & (y != 1)].tolist()})[:5]
        raise InputError(f"labels must be 0 or 1, got also {bad}; map your classes to 0/1 (1 = the property).")
    y = y.long()
    n1 = int(y.sum())
    if n1 == 0 or n1 == n:
        raise InputError(f"All {n} labels are {int(y[0])}: a probe needs examples of both labels (0 and 1); "
                         "add examples of the other class.")
    return y


def group_ids(groups, n: int) -> torch.Tensor | None:
    """One key per text (any hashable: a city, an int) -> [n] long ids in order of first appearance."""
    if groups is None:
        return None
    keys = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    if len(keys) != n:
        raise InputError(f"{len(keys)} groups for {n} texts; give one group key per text (or groups=None).")
    ids: dict = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


__all__ = ["Features", "group_ids", "POSITIONS", "Position", "check_labels", "check_position", "check_texts", "collect"]
