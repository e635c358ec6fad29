"""AUROC and accuracy of probe scores, written here (no scikit-learn in the core).

AUROC is the Mann-Whitney U statistic: the probability that a random positive scores above a random
negative, ties counted one half. Computed from average ranks, so it is exact with ties and O(n log n).
"""

from __future__ import annotations

import torch

from mechscope.errors import InputError


def _pair(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(scores).detach().reshape(-1).double().cpu()
    y = torch.as_tensor(labels).detach().reshape(-1).cpu()
    if s.shape != y.shape:
        raise InputError(f"{s.numel()} scores for {y.numel()} labels; give one score per label.")
    return s, y


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` [n] for 0/1 `labels` [n] (0.5 = chance, 1 = perfect ranking);
    NaN if only one class is present."""
    s, y = _pair(scores, labels)
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2  # mean of ranks (end - count + 1 .. end)
    ranks[order] = avg[inverse]
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def accuracy(scores, labels, threshold: float = 0.0) -> float:
    """Fraction of labels predicted right by `score > threshold` (probe scores are logits: threshold 0)."""
    s, y = _pair(scores, labels)
    return float(((s > threshold).long() == y.long()).double().mean())


__all__ = ["accuracy", "auroc"]
