"""Hook points: named places in the forward pass where users read or overwrite activations.

A HookPoint is an identity module named by its place in the module tree
(`blocks.3.attn.hook_q`). Hook functions have the TransformerLens signature
`fn(tensor, hook) -> tensor | None`; returning a tensor replaces the activation.

Why not torch's own module hooks: calling a HookPoint with nothing registered must cost
nothing (one attribute test), and components ask `hp.active` to decide whether to compute
optional things at all (per-head results, explicit attention patterns).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from mechscope.errors import HookReturnError, InputError

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]
Direction = Literal["fwd", "bwd"]

# the hook-name grammar: "blocks.{layer}.{rest}" inside the blocks, anything else outside them
_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def split_hook_name(name: str) -> tuple[int | None, str]:
    """'blocks.3.attn.hook_z' -> (3, 'attn.hook_z'); 'ln_final.hook_normalized' -> (None, 'ln_final.hook_normalized')."""
    m = _BLOCK_NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def layer_of(name: str) -> int | None:
    """The block index of a hook name ('blocks.3.hook_resid_post' -> 3), None outside the blocks
    (embeddings, ln_final, unembed). The one place that parses hook names."""
    return split_hook_name(name)[0]


def check_hook_return(name: str, out: Any, x: torch.Tensor) -> None:
    """A hook's return value must be able to stand in for the activation: a tensor of the same shape, dtype and
    device (a silently cast or truncated residual would give a wrong answer without a word)."""
    if not isinstance(out, torch.Tensor):
        raise HookReturnError(f"Hook on {name!r} returned {type(out).__name__}; return a tensor or None.")
    if out.shape != x.shape:
        raise HookReturnError(f"Hook on {name!r} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}.")
    if out.dtype != x.dtype:
        raise HookReturnError(f"Hook on {name!r} returned dtype {out.dtype}, but the activation is {x.dtype}; "
                              f"return out.to({x.dtype}) (a cast would silently change the model's computation).")
    if out.device != x.device:
        raise HookReturnError(f"Hook on {name!r} returned a tensor on {out.device}, but the activation is on "
                              f"{x.device}; move it with .to(activation.device).")


class HookHandle:
    """Removes one registered hook; returned by HookPoint.add_hook."""

    def __init__(self, hook_list: list, entry: tuple) -> None:
        self._list, self._entry = hook_list, entry

    def remove(self) -> None:
        try:
            self._list.remove(self._entry)
        except ValueError:
            pass  # already removed


class HookPoint(nn.Module):
    """Identity at a named activation; runs registered forward/backward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""  # set by the model once the tree is built
        self.fwd_hooks: list[tuple[HookFn, Any]] = []
        self.bwd_hooks: list[tuple[HookFn, Any]] = []
        self.ctx: dict[str, Any] = {}  # scratch space for hook functions, cleared with the hooks

    @property
    def active(self) -> bool:
        return bool(self.fwd_hooks or self.bwd_hooks)

    def add_hook(self, fn: HookFn, direction: Direction = "fwd", *, tag: Any = None) -> HookHandle:
        if not callable(fn):
            raise InputError(f"Hook for {self.name!r} must be callable, got {type(fn).__name__}.")
        if direction not in ("fwd", "bwd"):
            raise InputError(f"direction must be 'fwd' or 'bwd', got {direction!r}.")
        entry = (fn, tag)
        target = self.fwd_hooks if direction == "fwd" else self.bwd_hooks
        target.append(entry)
        return HookHandle(target, entry)

    def remove_hooks(self, direction: Literal["fwd", "bwd", "both"] = "both", tag: Any = None) -> None:
        """Remove hooks; with a tag, only those registered with that tag."""
        for d in ("fwd", "bwd"):
            if direction in (d, "both"):
                lst = self.fwd_hooks if d == "fwd" else self.bwd_hooks
                lst[:] = [] if tag is None else [e for e in lst if e[1] != tag]
        if not self.active:
            self.ctx.clear()

    # Overriding __call__ (not forward) skips nn.Module's dispatch: an unhooked point is free.
    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.fwd_hooks:
            for fn, _ in list(self.fwd_hooks):
                out = fn(x, self)
                if out is not None:
                    if out is not x:
                        check_hook_return(self.name, out, x)
                    x = out
        if self.bwd_hooks and x.requires_grad:
            x = x.view_as(x)  # a fresh node, so the hook sees exactly this activation's gradient
            for fn, _ in list(self.bwd_hooks):
                x.register_hook(lambda g, fn=fn: fn(g, self))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def extra_repr(self) -> str:
        return self.name
