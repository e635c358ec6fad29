"""Streaming per-hook statistics: mean, variance and norm of activations, in one pass.

Later steps need them: SAE input normalisation (scale so that E||x|| = sqrt(d)), mean
ablation (the mean activation), probes (standardisation). Sums are kept in float64 so that
millions of tokens add up exactly enough, and the accumulator state is itself a few tensors,
so a resumed harvest continues the same sums.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class RunningStats:
    """Accumulates count, Σx, Σx², Σ||x||, Σ||x||² over rows of [N, ...] activations."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.count = 0
        self.sum = torch.zeros(self.shape, dtype=torch.float64)  # [*shape]
        self.sum_sq = torch.zeros(self.shape, dtype=torch.float64)  # [*shape]
        self.sum_norm = 0.0
        self.sum_norm_sq = 0.0

    def update(self, x: torch.Tensor) -> None:
        """x: [N, *shape] in any float dtype / device."""
        x = x.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        # out of place: the accumulators may be inference tensors made inside torch.inference_mode
        self.sum = self.sum + x.sum(0)
        self.sum_sq = self.sum_sq + x.square().sum(0)
        norms_sq = x.flatten(1).square().sum(1)  # [N]
        self.sum_norm += norms_sq.sqrt().sum().item()
        self.sum_norm_sq += norms_sq.sum().item()

    # ------------------------------------------------------------------ results
    @property
    def mean(self) -> torch.Tensor:  # [*shape]
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:  # [*shape] population variance per dimension
        return (self.sum_sq / max(self.count, 1) - self.mean.square()).clamp_min(0)

    def summary(self) -> dict[str, Any]:
        """JSON-able scalars for the manifest."""
        n = max(self.count, 1)
        d = math.prod(self.shape)
        mean_norm = self.sum_norm / n
        total_var = float(self.var.sum())
        return {
            "count": self.count,
            "mean_norm": mean_norm,  # E||x||
            "rms_norm": math.sqrt(self.sum_norm_sq / n),  # sqrt(E||x||^2)
            "norm_of_mean": float(self.mean.norm()),  # ||E x||
            "total_variance": total_var,  # E||x - E x||^2, the FVE denominator
            # SAELens-style input scaling: multiply activations by this so that E||x|| = sqrt(d)
            "norm_scale": math.sqrt(d) / mean_norm if mean_norm > 0 else 1.0,
        }

    # ------------------------------------------------------------------ persistence
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        scalars = torch.tensor([self.count, self.sum_norm, self.sum_norm_sq], dtype=torch.float64)
        return {f"{prefix}.sum": self.sum, f"{prefix}.sum_sq": self.sum_sq, f"{prefix}.scalars": scalars}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str) -> RunningStats:
        s = cls(tuple(tensors[f"{prefix}.sum"].shape))
        s.sum = tensors[f"{prefix}.sum"].clone()
        s.sum_sq = tensors[f"{prefix}.sum_sq"].clone()
        count, s.sum_norm, s.sum_norm_sq = tensors[f"{prefix}.scalars"].tolist()
        s.count = int(count)
        return s
