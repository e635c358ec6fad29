"""An Edit: what ROME or MEMIT changed in a model, and how to take it back bit for bit.

The original matrices are kept (a copy of each edited `blocks[l].mlp.down.weight`), so `undo()` writes them
back exactly: not "subtract the update", which float rounding would make inexact. The update itself is kept
too (`deltas`), with the keys and values it was solved for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mechscope.edit.locate import EditRequest


def down_weight(model, layer: int) -> torch.nn.Parameter:
    """The MLP output projection of `layer`, nn.Linear layout [d_model, d_mlp]."""
    return model.blocks[layer].mlp.down.weight


@dataclass
class Edit:
    """method: "rome" or "memit"; layers edited; requests written; originals {layer: W before} and deltas
    {layer: W after - W before, float32}; keys {layer: [n, d_mlp]} and values {layer: [n, d_model]} the update was
    solved for (ROME: the down projection maps keys[l][0] to values[l][0] afterwards); info: optimisation notes."""

    model: Any
    method: str
    layers: list[int]
    requests: list[EditRequest]
    originals: dict[int, torch.Tensor] = field(repr=False)
    deltas: dict[int, torch.Tensor] = field(repr=False)
    keys: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)
    values: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    undone: bool = False

    @torch.no_grad()
    def undo(self) -> None:
        """Write the original weights back (bit for bit). Undo stacked edits of the same layers in reverse order;
        a second undo does nothing."""
        if self.undone:
            return
        for layer, w in self.originals.items():
            down_weight(self.model, layer).copy_(w)
        self.undone = True

    def __repr__(self) -> str:
        what = ", ".join(f"{r.subject!r} -> {r.target!r}" for r in self.requests[:3])
        more = f" (+{len(self.requests) - 3})" if len(self.requests) > 3 else ""
        return f"Edit({self.method}, layers {self.layers}, {what}{more}{', undone' if self.undone else ''})"


@torch.no_grad()
def apply_update(model, layer: int, update: torch.Tensor, originals: dict[int, torch.Tensor],
                 deltas: dict[int, torch.Tensor]) -> None:
    """W[layer] += update [d_model, d_mlp], in place (the parameter may be a non-contiguous view of a read-only
    mapped file: the in-place add never reaches the file). Keeps the first original of each layer."""
    w = down_weight(model, layer)
    if layer not in originals:
        originals[layer] = w.detach().clone()
    w.add_(update.to(w.device, w.dtype))
    deltas[layer] = (w.detach().float() - originals[layer].float()).cpu()


__all__ = ["Edit", "apply_update", "down_weight"]
