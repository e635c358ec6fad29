"""Metrics of a run's logits for patching and attribution: logit difference, token probability, KL divergence.

Any callable `metric(logits [B, T, V]) -> scalar | [B]` works with the circuits tools. The built-in metrics also
declare the positions they read (`logit_positions`) and a batched form (BatchedMetric), so a patching sweep
unembeds only those positions and scores all patches of a batch at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from mechscope.errors import InputError, MetricError


@runtime_checkable
class BatchedMetric(Protocol):
    """Optional fast path of a metric. `logit_positions`: the positions it reads (negative = from the end);
    `batched(logits [P, B, n, V]) -> [P] | [P, B]` where logits[:, :, i] holds position logit_positions[i]."""

    logit_positions: tuple[int, ...]

    def batched(self, logits: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...


def _ids(x: int | Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or t.dim() > 1:
        raise InputError(f"{what} must be a token id or a 1-D tensor/list of ids (one per prompt), got {t.dtype} "
                         f"{tuple(t.shape)}; get ids with model.to_single_token(' Mary').")
    return t.long()


class _PositionMetric:
    """A metric read at one position per prompt (int, or LongTensor [B] of per-prompt positions)."""

    def __init__(self, pos: int | Sequence[int] | torch.Tensor = -1, per_prompt: bool = False) -> None:
        p = torch.as_tensor(pos)
        if p.dim() > 1 or p.dtype.is_floating_point:
            raise InputError(f"pos must be an int or one int per prompt, got {tuple(p.shape)} {p.dtype}.")
        self.pos = p.long()
        self.per_prompt = per_prompt
        # positions read, in the order batched() expects them; per-prompt positions index into this tuple
        self.logit_positions: tuple[int, ...] = tuple(sorted(set(self.pos.reshape(-1).tolist())))
        self._slot = torch.as_tensor([self.logit_positions.index(v) for v in self.pos.reshape(-1).tolist()])

    def _rows(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., B, V] at each prompt's position -> [..., B]."""
        raise NotImplementedError

    def _reduce(self, v: torch.Tensor) -> torch.Tensor:  # [..., B] -> [..., B] or [...]
        return v if self.per_prompt else v.mean(-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # [B, T, V] -> scalar or [B]
        if self.pos.dim() == 0:
            at = logits[:, int(self.pos)]
        else:
            at = logits[torch.arange(logits.shape[0], device=logits.device), self.pos.to(logits.device)]
        return self._reduce(self._rows(at.float()))

    def batched(self, logits: torch.Tensor) -> torch.Tensor:  # [P, B, n, V] -> [P] or [P, B]
        if len(self.logit_positions) == 1:
            at = logits[:, :, 0]
        else:
            B = logits.shape[1]
            at = logits[:, torch.arange(B, device=logits.device), self._slot.to(logits.device).expand(B)]
        return self._reduce(self._rows(at.float()))

    def _per_row(self, t: torch.Tensor, B: int) -> torch.Tensor:
        if t.dim() == 1 and t.shape[0] not in (1, B):
            raise MetricError(f"{type(self).__name__} has {t.shape[0]} token ids but the batch has {B} prompts.")
        return t


class LogitDiff(_PositionMetric):
    """logit[correct] - logit[wrong] at `pos` (IOI's metric), mean over prompts (or per prompt)."""

    def __init__(self, correct: int | Sequence[int] | torch.Tensor, wrong: int | Sequence[int] | torch.Tensor,
                 pos: int | Sequence[int] | torch.Tensor = -1, per_prompt: bool = False) -> None:
        super().__init__(pos, per_prompt)
        self.correct, self.wrong = _ids(correct, "correct"), _ids(wrong, "wrong")

    def _rows(self, at: torch.Tensor) -> torch.Tensor:  # [..., B, V] -> [..., B]
        B = at.shape[-2]
        c = self._per_row(self.correct, B).to(at.device).expand(B)
        w = self._per_row(self.wrong, B).to(at.device).expand(B)
        idx = torch.arange(B, device=at.device)
        return at[..., idx, c] - at[..., idx, w]


class TokenProb(_PositionMetric):
    """Probability (or log-probability with log=True) of `tokens` at `pos`, mean over prompts."""

    def __init__(self, tokens: int | Sequence[int] | torch.Tensor, pos: int | Sequence[int] | torch.Tensor = -1,
                 log: bool = False, per_prompt: bool = False) -> None:
        super().__init__(pos, per_prompt)
        self.tokens, self.log = _ids(tokens, "tokens"), log

    def _rows(self, at: torch.Tensor) -> torch.Tensor:
        B = at.shape[-2]
        t = self._per_row(self.tokens, B).to(at.device).expand(B)
        lp = torch.log_softmax(at, dim=-1)[..., torch.arange(B, device=at.device), t]
        return lp if self.log else lp.exp()


class KLDivergence(_PositionMetric):
    """KL(reference || patched) of the next-token distributions at `pos`, mean over prompts.

    reference: logits [B, T, V] (read at pos) or [B, V], typically the clean run's logits."""

    def __init__(self, reference: torch.Tensor, pos: int | Sequence[int] | torch.Tensor = -1,
                 per_prompt: bool = False) -> None:
        super().__init__(pos, per_prompt)
        if reference.dim() == 3:
            ref = _PositionMetric(pos)
            reference = (reference[:, int(ref.pos)] if ref.pos.dim() == 0 else
                         reference[torch.arange(reference.shape[0]), ref.pos.to(reference.device)])
        if reference.dim() != 2:
            raise InputError(f"KLDivergence reference must be logits [B, T, V] or [B, V], got {tuple(reference.shape)}.")
        self.ref_logp = torch.log_softmax(reference.detach().float(), dim=-1)  # [B, V]

    def _rows(self, at: torch.Tensor) -> torch.Tensor:
        ref = self.ref_logp.to(at.device)
        if ref.shape[0] != at.shape[-2]:
            raise MetricError(f"KLDivergence reference has {ref.shape[0]} prompts but the batch has {at.shape[-2]}.")
        return (ref.exp() * (ref - torch.log_softmax(at, dim=-1))).sum(-1)


def check_metric_value(v: Any, B: int, what: str, *, detach: bool = True) -> torch.Tensor:
    """A metric's result checked: a finite scalar (0-d) or one value per prompt [B]; float32 and detached
    unless detach=False (attribution backpropagates through it, so a Python number is refused there)."""
    if isinstance(v, (int, float)) and detach:
        v = torch.tensor(float(v))
    if not isinstance(v, torch.Tensor):
        raise MetricError(f"The metric returned {type(v).__name__} on the {what}; it must return a scalar tensor "
                          f"(or one value per prompt, shape [{B}]).")
    if v.numel() == 1 and v.dim() <= 1:
        v = v.reshape(())
    elif tuple(v.shape) != (B,):
        raise MetricError(f"The metric returned shape {tuple(v.shape)} on the {what}; it must return a scalar "
                          f"(e.g. .mean() over prompts) or one value per prompt, shape [{B}].")
    if not bool(torch.isfinite(v).all()):
        raise MetricError(f"The metric returned a non-finite value ({v.detach().tolist()}) on the {what}.")
    return v.detach().float() if detach else v


__all__ = ["BatchedMetric", "KLDivergence", "LogitDiff", "TokenProb", "check_metric_value"]
