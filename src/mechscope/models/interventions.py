"""Interventions: change an activation while the model runs, the same way in every kind of run.

    steer = Add("blocks.6.hook_resid_post", direction, scale=4.0, positions=slice(5, None))
    logits = model(tokens, interventions=[steer])                  # forward
    logits, cache = model.run_with_cache(tokens, interventions=[steer])
    text = model.generate("I think", 20, interventions=[steer])    # KV cache on: each new token is steered too
    with model.interventions([steer]): activation_patching(...)    # every run of a patching sweep

Why not plain hooks: a hook sees a tensor, not where its rows sit in the sequence. During generation with a KV
cache each forward computes only the new token (T = 1), and a patching sweep computes only positions >= p0, so
"position 5" means a different column in each call. Every stage of the model's forward publishes its RunState
(absolute positions per row, real-token mask) in `model.run_state_now`; an intervention selects by absolute
position (0 = the first real token, padding never counts), so one object does the same thing in forward,
run_with_cache, batched patching and generate. Later layers of the toolkit (steering, feature clamping,
editing, monitors) subclass Intervention and need no change to the model.

Positions: None (all), an int, a list of ints, a slice of absolute positions (slice(5, None): from the sixth token
on, generated tokens included), or a callable positions [B, T] (long) -> bool [B, T]. Heads: for per-head hook
points ([B, T, H, E] or patterns [B, H, Tq, Tk]) restrict to some heads. Selected padding positions are never
changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.models.hooks import HookPoint
    from mechscope.models.transformer import HookedTransformer

Positions = int | Sequence[int] | slice | Callable[[torch.Tensor], torch.Tensor] | None
_QUERY_FIRST = ("hook_pattern", "hook_attn_scores")  # [B, H, Tq, Tk]: the position dim is 2
_PER_HEAD = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result")


def position_dim(hook_name: str) -> int:
    """Which dim of a hook point's activation is the (query) position: 2 for patterns/scores, else 1."""
    return 2 if hook_name.endswith(_QUERY_FIRST) else 1


def head_dim(hook_name: str) -> int | None:
    """Which dim holds heads: 1 for patterns/scores [B, H, T, S], 2 for [B, T, H, E] per-head points."""
    if hook_name.endswith(_QUERY_FIRST):
        return 1
    return 2 if hook_name.endswith(_PER_HEAD) else None


def select_positions(positions: Positions, pos: torch.Tensor) -> torch.Tensor | None:
    """bool [B, T] of the absolute positions `pos` [B, T] that `positions` selects (None = all)."""
    if positions is None:
        return None
    if callable(positions) and not isinstance(positions, slice):
        sel = positions(pos)
        if not isinstance(sel, torch.Tensor) or sel.shape != pos.shape or sel.dtype != torch.bool:
            raise InputError(f"A positions callable must return a bool tensor of shape {tuple(pos.shape)} "
                             "(True = intervene), given the absolute positions [batch, pos].")
        return sel
    if isinstance(positions, slice):
        if positions.step not in (None, 1):
            raise InputError("A positions slice takes no step; pass a list of positions instead.")
        sel = torch.ones_like(pos, dtype=torch.bool)
        if positions.start is not None:
            sel &= pos >= positions.start
        if positions.stop is not None:
            sel &= pos < positions.stop
        return sel
    want = torch.as_tensor([positions] if isinstance(positions, int) else list(positions), dtype=torch.long)
    return torch.isin(pos, want.to(pos.device))


def check_positions(positions: Positions) -> Positions:
    """Validate a positions argument once, when the intervention is made."""
    if positions is None or isinstance(positions, slice) or (callable(positions)):
        if isinstance(positions, slice) and any(v is not None and (not isinstance(v, int) or v < 0)
                                                for v in (positions.start, positions.stop)):
            raise InputError(f"positions slice bounds must be absolute positions >= 0, got {positions}.")
        return positions
    items = [positions] if isinstance(positions, int) else positions
    try:
        items = [int(p) for p in items]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(f"positions must be None, an int, a list of ints, a slice or a callable; got "
                         f"{positions!r}.") from None
    if not items or any(p < 0 for p in items):
        raise InputError(f"positions are absolute token positions >= 0 (0 = the first token; padding does not "
                         f"count), got {positions!r}. Negative positions are ambiguous while generating.")
    return positions


class Intervention:
    """Base class: `edit(act, where)` returns the new activation; `where` is a bool mask broadcastable to act
    (True = change here) or None for everywhere. Subclasses implement `edit` only."""

    def __init__(self, hook: str, positions: Positions = None, heads: int | Sequence[int] | None = None) -> None:
        if not isinstance(hook, str) or not hook:
            raise InputError(f"An intervention needs a hook name (e.g. 'blocks.3.hook_resid_post'), got {hook!r}.")
        self.hook = hook
        self.positions = check_positions(positions)
        self.heads = None if heads is None else ([heads] if isinstance(heads, int) else [int(h) for h in heads])

    # -- called by the model -------------------------------------------------------------------------------
    def bind(self, model: HookedTransformer) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
        """The hook function that applies this intervention inside `model`'s runs."""

        def hook_fn(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return self.edit(act, self.where(act, hook.name, model))

        hook_fn.intervention = self  # type: ignore[attr-defined]
        return hook_fn

    def where(self, act: torch.Tensor, name: str, model: HookedTransformer) -> torch.Tensor | None:
        """bool mask broadcastable to act: selected positions (and heads), never padding; None = all."""
        pd = position_dim(name)
        state = model.run_state_now
        sel = None
        if state is not None and act.dim() > pd and act.shape[pd] == state.positions.shape[1]:
            rows = act.shape[0]
            sel = select_positions(self.positions, state.positions[:rows].to(act.device))
            if state.real is not None:  # padding is never changed
                real = state.real[:rows].to(act.device)
                sel = real if sel is None else sel & real
        elif self.positions is not None:
            raise InputError(f"Intervention on {name!r} selects positions, but this activation "
                             f"{tuple(act.shape)} is not computed inside a model run with known positions.")
        if sel is not None:  # [B, T] -> broadcastable: [B, T, 1...] or [B, 1, T, 1] for patterns
            shape = [sel.shape[0]] + [1] * (act.dim() - 1)
            shape[pd] = sel.shape[1]
            sel = sel.reshape(shape)
        if self.heads is not None:
            hd = head_dim(name)
            if hd is None or act.dim() <= hd:
                raise InputError(f"heads= needs a per-head hook point (hook_q/k/v/z/result, pattern, "
                                 f"attn_scores); {name!r} has no head dimension.")
            n = act.shape[hd]
            if any(not 0 <= h < n for h in self.heads):
                raise InputError(f"heads {self.heads} out of range for {name!r}, which has {n} heads.")
            hm = torch.zeros(n, dtype=torch.bool, device=act.device)
            hm[self.heads] = True
            shape = [1] * act.dim()
            shape[hd] = n
            hm = hm.reshape(shape)
            sel = hm if sel is None else sel & hm
        return sel

    # -- what subclasses implement -------------------------------------------------------------------------
    def edit(self, act: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def blend(act: torch.Tensor, new: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        """new where selected, act elsewhere (differentiable, never in place)."""
        return new if where is None else torch.where(where, new, act)

    def __repr__(self) -> str:
        extra = "" if self.positions is None else f", positions={self.positions!r}"
        extra += "" if self.heads is None else f", heads={self.heads}"
        return f"{type(self).__name__}({self.hook!r}{extra})"


def _vector(v: Any, act: torch.Tensor, name: str, what: str) -> torch.Tensor:
    t = torch.as_tensor(v)
    if t.dim() == 0 or t.shape[-1] != act.shape[-1]:
        raise InputError(f"{what} has shape {tuple(t.shape)} but {name} activations have width {act.shape[-1]} "
                         f"(shape {tuple(act.shape)}); give a vector of that width.")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} for {name} contains NaN or inf.")
    return t.to(act.device, act.dtype)


class Add(Intervention):
    """act + scale * vector at the selected positions: a steering vector (vector [d] or broadcastable)."""

    def __init__(self, hook: str, vector: torch.Tensor, scale: float = 1.0, positions: Positions = None,
                 heads: int | Sequence[int] | None = None) -> None:
        super().__init__(hook, positions, heads)
        self.vector, self.scale = torch.as_tensor(vector).detach(), float(scale)

    def edit(self, act, where):
        v = _vector(self.vector, act, self.hook, "The vector")
        return self.blend(act, act + self.scale * v, where)


class Set(Intervention):
    """Replace the activation by `value` (broadcastable to it) at the selected positions."""

    def __init__(self, hook: str, value: torch.Tensor | float, positions: Positions = None,
                 heads: int | Sequence[int] | None = None) -> None:
        super().__init__(hook, positions, heads)
        self.value = torch.as_tensor(value).detach()

    def edit(self, act, where):
        return self.blend(act, self.value.to(act.device, act.dtype).expand_as(act), where)


class Scale(Intervention):
    """Multiply the activation by `factor` at the selected positions (0 = zero ablation)."""

    def __init__(self, hook: str, factor: float, positions: Positions = None,
                 heads: int | Sequence[int] | None = None) -> None:
        super().__init__(hook, positions, heads)
        self.factor = float(factor)

    def edit(self, act, where):
        return self.blend(act, act * self.factor, where)


class Ablate(Intervention):
    """Directional ablation: remove the component along `direction` (x - (x . d) d, d normalised)."""

    def __init__(self, hook: str, direction: torch.Tensor, positions: Positions = None) -> None:
        super().__init__(hook, positions)
        d = torch.as_tensor(direction).detach().float()
        if d.dim() != 1 or not bool(torch.isfinite(d).all()) or float(d.norm()) == 0:
            raise InputError(f"direction must be a finite non-zero vector [d], got shape {tuple(d.shape)}.")
        self.direction = d / d.norm()

    def edit(self, act, where):
        d = _vector(self.direction, act, self.hook, "The direction")
        return self.blend(act, act - (act @ d)[..., None] * d, where)


class Apply(Intervention):
    """Any function of the activation: fn(act) -> new act of the same shape, applied at the selected
    positions (e.g. an SAE's reconstruction with one latent clamped)."""

    def __init__(self, hook: str, fn: Callable[[torch.Tensor], torch.Tensor], positions: Positions = None,
                 heads: int | Sequence[int] | None = None) -> None:
        super().__init__(hook, positions, heads)
        if not callable(fn):
            raise InputError(f"Apply needs a callable act -> act, got {type(fn).__name__}.")
        self.fn = fn

    def edit(self, act, where):
        new = self.fn(act)
        if not isinstance(new, torch.Tensor) or new.shape != act.shape:
            raise InputError(f"The function of Apply({self.hook!r}) must return a tensor of shape "
                             f"{tuple(act.shape)}, got {getattr(new, 'shape', type(new).__name__)}.")
        return self.blend(act, new.to(act.dtype), where)


def check_interventions(interventions: Any) -> list[Intervention]:
    """A list of Intervention objects (a single one is accepted), or InputError."""
    if interventions is None:
        return []
    if isinstance(interventions, Intervention):
        return [interventions]
    items = list(interventions)
    bad = [type(i).__name__ for i in items if not isinstance(i, Intervention)]
    if bad:
        raise InputError(f"interventions must be Intervention objects (Add, Set, Scale, Ablate, Apply or a "
                         f"subclass), got {bad[0]}; for a plain hook function use fwd_hooks=.")
    return items
