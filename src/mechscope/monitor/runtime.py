"""MonitorRun: the per-generation state of a set of monitors (the generation loop's observer).

Why one hook per hook point: several monitors on the same activation share one read (and the hooks are
read-only, so the forward the model runs anyway is the only one: no second pass). Each hook scores only the
newest position (with the KV cache that is the whole activation, T = 1; at step 0 it is the prompt's last
token), keeps the scores on the device, and `step` reads all of them with one transfer.

Window and hysteresis are per monitor and per batch row. Steering armed by a monitor is a copy of its
interventions whose positions start at the next token's absolute position (per row), entered into the
running generation's hook context: the forward that already ran is not redone.
"""

from __future__ import annotations

import contextlib
import copy
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from mechscope.errors import InputError
from mechscope.models.interventions import select_positions
from mechscope.monitor.monitors import Monitor
from mechscope.monitor.trace import Alert, TokenTrace

_NEVER = 1 << 62  # a start position no run reaches


def _from(orig, start: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """positions callable: the intervention's own selection, from start[row] on (absolute positions)."""

    def select(pos: torch.Tensor) -> torch.Tensor:  # pos [B, T] long -> bool [B, T]
        sel = pos >= start[: pos.shape[0], None]
        own = select_positions(orig, pos)
        return sel if own is None else sel & own

    return select


class MonitorRun:
    """Observer of one generation (see models.generate.run_generation): registers the monitors' hooks,
    turns scores into events and actions, and collects each row's trace, alerts and emitted tokens."""

    def __init__(self, monitors: list[Monitor], tokenizer, *, on_token: Callable[[TokenTrace], Any] | None = None,
                 eos_token_id: int | None = None) -> None:
        self.monitors, self.tok, self.on_token, self.eos = monitors, tokenizer, on_token, eos_token_id
        self.by_hook: dict[str, list[Monitor]] = {}
        for m in monitors:
            self.by_hook.setdefault(m.hook, []).append(m)
        self._raw: dict[str, torch.Tensor] = {}  # monitor name -> [B] scores of this step (on the device)

    # ------------------------------------------------------------------ observer protocol
    @contextlib.contextmanager
    def active(self, model, tokens: torch.Tensor, mask: torch.Tensor):
        """Register one read-only hook per hook point for the whole generation (and later the armed steers)."""
        B = tokens.shape[0]
        self.model = model
        self.read_pos = (mask.sum(1) - 1).tolist()  # [B] absolute position read at step 0 (prompt's last token)
        self.traces: list[list[TokenTrace]] = [[] for _ in range(B)]
        self.alerts: list[list[Alert]] = [[] for _ in range(B)]
        self.emitted: list[list[int]] = [[] for _ in range(B)]
        self.stopped_by: list[str | None] = [None] * B
        self.ended = [False] * B
        self.windows = {m.name: [deque(maxlen=m.window) for _ in range(B)] for m in self.monitors}
        self.armed = {m.name: [True] * B for m in self.monitors}
        self.steer_start: dict[str, torch.Tensor] = {}
        self.steered: dict[str, set[int]] = {}
        with contextlib.ExitStack() as stack:
            self.stack = stack
            stack.enter_context(model.hooks(fwd_hooks=[(h, self._hook(ms)) for h, ms in self.by_hook.items()]))
            yield self

    def _hook(self, group: list[Monitor]):
        raw = self._raw

        def read(act: torch.Tensor, hook) -> None:
            last = act[:, -1:]  # [B, 1, ...] the newest position only
            for m in group:
                s = m.score(last)
                if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(last.shape[:2]):
                    raise InputError(f"Monitor {m.name!r} on {hook.name} must score a [batch, pos, d] activation "
                                     f"to [batch, pos]; got {getattr(s, 'shape', s)!r} from {tuple(act.shape)}.")
                raw[m.name] = s[:, 0]
            return None

        return read

    def step(self, step: int, next_ids: torch.Tensor, finished: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """After step `step`'s forward: score, fire, act. Returns ([B] rows that end here, stop everything)."""
        names = [m.name for m in self.monitors]
        if names:
            missing = [n for n in names if n not in self._raw]
            if missing:
                raise InputError(f"Monitors {missing} were not scored by this forward (their hook did not run).")
            table = torch.stack([self._raw[n].double() for n in names], 1).cpu().tolist()  # [B, M], one sync
        else:
            table = [[] for _ in range(next_ids.shape[0])]
        self._raw.clear()
        ids, fin = next_ids.tolist(), finished.tolist()
        end = [False] * len(ids)
        for b, (row_ids, row_done) in enumerate(zip(ids, fin)):
            if row_done or self.ended[b]:
                continue
            end[b] = self._row(b, step, row_ids, table[b])
        return torch.tensor(end, dtype=torch.bool, device=next_ids.device), all(self.ended)

    # ------------------------------------------------------------------ one row
    def _row(self, b: int, step: int, token_id: int, raw: list[float]) -> bool:
        pos = self.read_pos[b] + step
        t = TokenTrace(step, pos, token_id, None)
        stop_by = None
        for m, r in zip(self.monitors, raw):
            win = self.windows[m.name][b]
            win.append(r)
            score = sum(win) / len(win)
            fired = False
            if m.scope == "prompt" and step > 0:  # a prompt gate: traced, never fires after step 0
                t.scores[m.name], t.fired[m.name] = score, False
                continue
            if self.armed[m.name][b] and score > m.threshold:
                fired, self.armed[m.name][b] = True, False
            elif not self.armed[m.name][b] and score <= m.threshold - m.hysteresis:
                self.armed[m.name][b] = True
            t.scores[m.name], t.fired[m.name] = score, fired
            if not fired or m.action == "record":
                continue
            t.actions.append(f"{m.action}:{m.name}")
            alert = Alert(m.name, step, pos, score, m.action)
            self.alerts[b].append(alert)
            if m.action == "stop" and stop_by is None:
                stop_by = m.name
            elif m.action == "steer":
                self._arm(m, b, pos + 1)
            if m.on_alert is not None:
                m.on_alert(alert)
        if stop_by is not None:  # the token this step predicted is never emitted
            t.token_id = None
            self.stopped_by[b], self.ended[b] = stop_by, True
        else:
            self.emitted[b].append(token_id)
            t.token = self.tok.decode([token_id]) if self.tok is not None else None
            if self.eos is not None and token_id == self.eos:
                self.stopped_by[b], self.ended[b] = "eos", True
        self.traces[b].append(t)
        if self.on_token is not None and self.on_token(t) is False and not self.ended[b]:
            self.stopped_by[b], self.ended[b] = "cancelled", True
        return self.ended[b]

    def _arm(self, m: Monitor, b: int, start: int) -> None:
        """Steer row b from absolute position `start` on (the next forward's token)."""
        if m.name not in self.steer_start:
            starts = torch.full((len(self.ended),), _NEVER, dtype=torch.long, device=self.model.device)
            self.steer_start[m.name] = starts
            copies = []
            for iv in m.steer:
                c = copy.copy(iv)
                c.positions = _from(iv.positions, starts)
                copies.append(c)
            self.stack.enter_context(self.model.interventions(copies))
        starts = self.steer_start[m.name]
        if b not in self.steered.setdefault(m.name, set()):  # the first firing starts it; it then stays on
            self.steered[m.name].add(b)
            starts[b] = start


__all__ = ["MonitorRun"]
