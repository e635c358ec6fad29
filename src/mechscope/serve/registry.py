"""The service's set of loaded monitors, and conversions of monitor results to the API's JSON models.

Why a registry: monitors are added and removed while generations run. A request takes a snapshot (a
list of monitor objects) when it is admitted, so a later DELETE never changes a generation in flight.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Sequence

from mechscope.serve.schemas import AlertOut, MonitorInfo, TokenOut

COMMON = ("name", "kind", "hook", "threshold", "action", "window", "hysteresis", "scope")


class UnknownMonitorError(LookupError):
    """A request named monitors that are not loaded."""


class DuplicateMonitorError(ValueError):
    """A monitor of that name is already loaded."""


def finite(x) -> float | None:
    """A JSON-safe float: NaN / inf (e.g. a score of an empty window) become None."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def describe(m) -> MonitorInfo:
    """What GET /v1/monitors shows of a monitor: its `describe()` common fields (monitor contract)."""
    d = m.describe() if hasattr(m, "describe") else {}
    window = d.get("window", getattr(m, "window", None))
    return MonitorInfo(name=str(m.name), kind=str(d.get("kind", getattr(m, "kind", type(m).__name__))),
                       hook=d.get("hook", getattr(m, "hook", None)),
                       threshold=finite(d.get("threshold", getattr(m, "threshold", None))),
                       action=d.get("action", getattr(m, "action", None)),
                       window=int(window) if isinstance(window, int) else None,
                       hysteresis=finite(d.get("hysteresis", getattr(m, "hysteresis", None))),
                       scope=d.get("scope", getattr(m, "scope", None)),
                       details=json.loads(json.dumps({k: v for k, v in d.items() if k not in COMMON}, default=str)))


class MonitorRegistry:
    """Name -> monitor, with a lock; `select` returns the snapshot a generation runs with."""

    def __init__(self, monitors: Iterable = ()):
        self._lock = threading.Lock()
        self._monitors: dict[str, object] = {}
        self.add(list(monitors))

    def names(self) -> list[str]:
        with self._lock:
            return list(self._monitors)

    def infos(self) -> list[MonitorInfo]:
        with self._lock:
            return [describe(m) for m in self._monitors.values()]

    def add(self, monitors: Sequence, replace: bool = False) -> list[str]:
        """Add all of `monitors` or none (a duplicate name, within them or with a loaded one, adds nothing)."""
        names = [str(m.name) for m in monitors]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise DuplicateMonitorError(f"Monitor names must be unique; repeated: {sorted(dup)}.")
        with self._lock:
            taken = [n for n in names if n in self._monitors]
            if taken and not replace:
                raise DuplicateMonitorError(
                    f"Monitor(s) {taken} are already loaded; DELETE /v1/monitors/{{name}} first, or pass "
                    f'"replace": true.')
            for n, m in zip(names, monitors):
                self._monitors[n] = m
        return names

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._monitors:
                raise UnknownMonitorError(f"No monitor named {name!r} is loaded; loaded: {list(self._monitors)}.")
            del self._monitors[name]

    def select(self, names: Sequence[str] | None) -> list:
        """The monitors named (all loaded ones for None), in the order asked; unknown names raise."""
        with self._lock:
            if names is None:
                return list(self._monitors.values())
            unknown = [n for n in names if n not in self._monitors]
            if unknown:
                raise UnknownMonitorError(f"Unknown monitor(s) {unknown[:10]}; loaded monitors: "
                                          f"{list(self._monitors)} (see GET /v1/monitors).")
            if len(set(names)) != len(names):
                raise DuplicateMonitorError(f"A monitor is named twice in {list(names)[:20]}.")
            return [self._monitors[n] for n in names]


def token_out(t) -> TokenOut:
    """A monitor.TokenTrace as JSON (non-finite scores become null)."""
    return TokenOut(index=int(t.index), position=getattr(t, "position", None), token_id=getattr(t, "token_id", None),
                    token=getattr(t, "token", None),
                    scores={str(k): finite(v) for k, v in (getattr(t, "scores", None) or {}).items()},
                    fired={str(k): bool(v) for k, v in (getattr(t, "fired", None) or {}).items()},
                    actions=[str(a) for a in (getattr(t, "actions", None) or [])])


def alert_out(a) -> AlertOut:
    return AlertOut(monitor=str(a.monitor), index=int(a.index), position=getattr(a, "position", None),
                    score=finite(getattr(a, "score", None)), action=getattr(a, "action", None))
