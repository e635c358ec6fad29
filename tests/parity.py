"""Shared parity checks against transformers: the ground truth for every family."""

from __future__ import annotations

import torch

LENGTHS = (11, 7, 4)  # a batch of 3 prompts of different lengths


def padded_batch(vocab: int, side: str, seed: int = 0, lengths=LENGTHS, low: int = 3):
    """Random token ids [3, T] and attention mask [3, T], padded on `side`."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids = torch.randint(low, vocab, (n,), generator=g)
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        tokens[i, sl], mask[i, sl] = ids, 1
    return tokens, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens (what mechscope uses), passed explicitly to HF."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def logprob_diff(hf_model, model, vocab: int, side: str, seed: int = 0, hf_kwargs=None, **kw) -> float:
    """Max |log-softmax difference| over real (non-pad) positions, batch of 3 with padding."""
    tokens, mask = padded_batch(vocab, side, seed)
    ref = hf_model(tokens, attention_mask=mask, position_ids=hf_positions(mask), **(hf_kwargs or {})).logits
    ours = model(tokens, attention_mask=mask, **kw)
    diff = (torch.log_softmax(ref.float(), -1) - torch.log_softmax(ours.float(), -1)).abs()
    return float(diff[mask.bool()].max())


@torch.no_grad()
def batched_equals_single(model, vocab: int, side: str, seed: int = 0) -> float:
    """Max |logit difference| between a padded batch and each prompt run alone."""
    tokens, mask = padded_batch(vocab, side, seed)
    batched = model(tokens, attention_mask=mask)
    worst = 0.0
    for i in range(tokens.shape[0]):
        real = mask[i].bool()
        alone = model(tokens[i, real][None])[0]
        worst = max(worst, float((batched[i, real] - alone).abs().max()))
    return worst
