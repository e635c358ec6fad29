"""pydantic models of every request and response of `mechscope serve`.

Requests are strict (`"max_new_tokens": "5"` or `5.0` or `true` is refused, not coerced) and forbid unknown
fields, so a typo such as `max_tokens` is a clear 422 instead of a silently ignored option. Limits that
depend on the server's settings (max prompt tokens, max new tokens, the model's context) are checked by
the app after parsing, with messages that name the setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_NAME = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(_Strict):
    """POST /v1/generate and /v1/generate/stream."""

    prompt: str = Field(min_length=1, description="the prompt text")
    max_new_tokens: int = Field(32, ge=1, description="tokens to generate (at most the server's --max-new-tokens)")
    monitors: list[str] | None = Field(None, max_length=256,
                                       description="names of loaded monitors to run (default: all of them)")


ACTIONS = ("record", "alert", "stop", "steer")


class AddMonitorRequest(_Strict):
    """POST /v1/monitors, one of: `file` (a monitors folder / JSON written by monitor.save_monitors, on the
    server's disk; `names` picks some of its monitors), `spec` (one monitor spec as in monitors.json, any kind:
    probe / feature paths on the server's disk, a direction inline), or an inline direction monitor
    (`kind` "direction" with name, hook, direction, threshold)."""

    file: str | None = Field(None, min_length=1, max_length=4096)
    names: list[str] | None = Field(None, max_length=256)
    spec: dict | None = None
    kind: Literal["direction"] | None = None
    name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    hook: str | None = Field(None, min_length=1, max_length=256)
    direction: list[float] | None = Field(None, min_length=1, max_length=65_536)
    threshold: float | None = Field(None, allow_inf_nan=False)
    window: int = Field(1, ge=1, le=4096)
    hysteresis: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    action: Literal["record", "alert", "stop"] = "alert"
    scope: Literal["all", "prompt"] = Field("all", description='"prompt": fire only on the prompt\'s last token')
    replace: bool = Field(False, description="replace loaded monitors of the same name (else 409)")


class MonitorInfo(BaseModel):
    """One loaded monitor, as listed by GET /v1/monitors."""

    name: str
    kind: str
    hook: str | None = None
    threshold: float | None = None
    action: str | None = None
    window: int | None = None
    hysteresis: float | None = None
    scope: str | None = None
    details: dict = Field({}, description="the kind's own fields (latents, reduce, probe / SAE source ...)")


class MonitorsChanged(BaseModel):
    added: list[str] = []
    removed: list[str] = []
    monitors: list[MonitorInfo]


class TokenOut(BaseModel):
    """One step of a monitored generation (monitor.TokenTrace): token None when a stop blocked it."""

    index: int
    position: int | None = None
    token_id: int | None = None
    token: str | None = None
    scores: dict[str, float | None] = {}
    fired: dict[str, bool] = {}
    actions: list[str] = []


class AlertOut(BaseModel):
    monitor: str
    index: int
    position: int | None = None
    score: float | None = None
    action: str | None = None


class GenerateResponse(BaseModel):
    text: str = Field(description="the completion only")
    prompt: str
    trace: list[TokenOut]
    alerts: list[AlertOut]
    stopped_by: str | None = None
    monitors: list[str]
    n_tokens: int
    prompt_tokens: int
    latency_s: float
    queue_wait_s: float
    timed_out: bool = False


class QueueInfo(BaseModel):
    pending: int
    max_queue: int
    timeout_s: float


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    n_layers: int
    d_model: int
    n_ctx: int
    monitors: list[str]
    queue: QueueInfo
    limits: dict[str, int]


class Percentiles(BaseModel):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class RequestCount(BaseModel):
    method: str
    route: str
    status: int
    count: int


class MetricsResponse(BaseModel):
    uptime_s: float
    requests_total: int
    requests_by_status: dict[str, int]
    requests: list[RequestCount]
    generations: int
    tokens_generated: int
    alerts_total: int
    alerts_by_monitor: dict[str, int]
    rejected_queue_full: int
    timeouts: int
    generation_errors: int
    latency_s: Percentiles
    queue_wait_s: Percentiles
    queue: QueueInfo


class ErrorResponse(BaseModel):
    """Every 4xx (and the rare 5xx) body: a one-line message, plus the field errors for a 422."""

    detail: str
    errors: list[dict] | None = None
