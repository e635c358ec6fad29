"""What a monitored generation returns: the text, one TokenTrace per step, the alerts, why it stopped.

Step t's forward reads position `position` (step 0: the prompt's last token) and predicts token t, which sits at
position + 1. A token blocked by a "stop" monitor has token_id and token None: it was never emitted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TokenTrace:
    """One generation step."""

    index: int  # step number (0 = the prompt's forward, which predicts the first new token)
    position: int  # absolute position the monitors read (the token predicting this one; padding never counts)
    token_id: int | None  # the token this step produced; None if a stop monitor blocked it
    token: str | None  # its text; None if blocked
    scores: dict[str, float] = field(default_factory=dict)  # monitor name -> windowed score
    fired: dict[str, bool] = field(default_factory=dict)  # monitor name -> fired at this step
    actions: list[str] = field(default_factory=list)  # "alert:name", "stop:name", "steer:name" taken here

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Alert:
    """A monitor with action alert / stop / steer fired (record-only monitors show in the trace only)."""

    monitor: str
    index: int  # the step (TokenTrace.index)
    position: int
    score: float
    action: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MonitoredGeneration:
    """model.generate(prompt, n, monitors=...) -> this (a list of them for a list of prompts)."""

    prompt: str
    text: str  # the completion only (the emitted tokens, decoded)
    trace: list[TokenTrace]
    alerts: list[Alert]
    stopped_by: str | None  # None (max_new_tokens reached) | a monitor's name | "cancelled" | "eos"
    token_ids: list[int] = field(default_factory=list)  # the emitted tokens

    @property
    def full_text(self) -> str:
        return self.prompt + self.text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (plain str / int / float / bool / None / lists / dicts)."""
        return {"prompt": self.prompt, "text": self.text, "full_text": self.full_text,
                "trace": [t.to_dict() for t in self.trace], "alerts": [a.to_dict() for a in self.alerts],
                "stopped_by": self.stopped_by, "token_ids": list(self.token_ids)}


__all__ = ["Alert", "MonitoredGeneration", "TokenTrace"]
