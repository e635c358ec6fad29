"""The generation engine behind `mechscope serve`: one model, one worker thread, a bounded queue.

Why one worker: the model is shared and monitors attach (read-only) hooks to it for the length of a
generation, so two generations at once would see each other's hooks; generation is CPU-bound anyway, so
a second worker would only split the same cores. Requests beyond `max_queue` waiting ones are refused at
once (the app answers 429 with Retry-After) instead of piling up, and every job carries a deadline that
the worker enforces between tokens through the `on_token` callback (returning False cancels generation),
so a slow request cannot hold the queue for longer than `timeout_s`. A job's exception is caught in the
worker and handed back to that job's caller only: it never touches another request.

No FastAPI here: the engine and the metrics are plain Python, testable without the `serve` extra.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(Exception):
    """Every queue slot is taken; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int, pending: int):
        super().__init__(f"The generation queue is full ({pending} requests pending); retry in {retry_after} s.")
        self.retry_after = retry_after


class QueueTimeoutError(Exception):
    """The job waited in the queue past its deadline and was never started."""


class CancelledJobError(Exception):
    """The caller went away (e.g. a closed stream) before the job started."""


@dataclass
class Job:
    """One generation request as the worker sees it."""

    prompt: str
    max_new_tokens: int
    monitors: list  # monitor.Monitor objects (a snapshot taken when the request was admitted)
    deadline: float  # time.monotonic() after which generation is cut
    on_token: Callable[[Any], None] | None = None  # called in the worker thread with each TokenTrace
    cancelled: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    started: float | None = None  # monotonic time the worker picked the job up


class Metrics:
    """Counters and a window of recent latencies (thread-safe; read by GET /metrics)."""

    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, route, status) -> n
        self.latencies: deque[float] = deque(maxlen=window)  # seconds, completed generations
        self.queue_waits: deque[float] = deque(maxlen=window)
        self.alerts: Counter[str] = Counter()  # monitor name -> alerts fired
        self.generations = 0
        self.tokens = 0
        self.rejected = 0  # queue full
        self.timeouts = 0
        self.errors = 0  # generations that raised

    def request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1

    def generation(self, latency_s: float, wait_s: float, n_tokens: int, alerts: Sequence[str],
                   timed_out: bool) -> None:
        with self._lock:
            self.generations += 1
            self.tokens += n_tokens
            self.latencies.append(latency_s)
            self.queue_waits.append(wait_s)
            self.alerts.update(alerts)
            self.timeouts += int(timed_out)

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def percentiles(self, which: str = "latencies", qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
        """Nearest-rank percentiles (seconds) over the window; None before the first generation."""
        with self._lock:
            xs = sorted(getattr(self, which))
        if not xs:
            return {f"p{q:g}": None for q in qs}
        return {f"p{q:g}": xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))] for q in qs}

    def snapshot(self) -> dict:
        with self._lock:
            by_status: Counter[str] = Counter()
            for (_, _, status), n in self.requests.items():
                by_status[str(status)] += n
            return {
                "uptime_s": time.time() - self.started,
                "requests_total": sum(self.requests.values()),
                "requests_by_status": dict(by_status),
                "requests": [{"method": m, "route": r, "status": s, "count": n}
                             for (m, r, s), n in sorted(self.requests.items())],
                "generations": self.generations,
                "tokens_generated": self.tokens,
                "alerts_total": sum(self.alerts.values()),
                "alerts_by_monitor": dict(self.alerts),
                "rejected_queue_full": self.rejected,
                "timeouts": self.timeouts,
                "generation_errors": self.errors,
            }


class Engine:
    """Runs generation jobs on one worker thread; at most `max_queue` jobs wait behind the running one.

    `generate_fn(prompt, max_new_tokens, monitors=..., on_token=...)` is `model.generate` by default."""

    def __init__(self, generate_fn: Callable[..., Any], *, max_queue: int = 8, timeout_s: float = 60.0,
                 metrics: Metrics | None = None):
        self.generate_fn = generate_fn
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.metrics = metrics or Metrics()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mechscope-generate")
        self._lock = threading.Lock()
        self._pending = 0  # admitted jobs not yet finished (running + waiting)

    @property
    def pending(self) -> int:
        return self._pending

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the median latency times the jobs ahead, 1..60."""
        p50 = self.metrics.percentiles(qs=(50,))["p50"] or 1.0
        return int(min(60, max(1, math.ceil(p50 * max(1, self._pending)))))

    def submit(self, job: Job) -> Future:
        """Admit `job` (QueueFullError when max_queue jobs already wait) and queue it on the worker."""
        with self._lock:
            if self._pending >= self.max_queue + 1:
                self.metrics.count("rejected")
                raise QueueFullError(self.retry_after(), self._pending)
            self._pending += 1
        try:
            fut = self._pool.submit(self._run, job)
        except BaseException:
            self._release()
            raise
        fut.add_done_callback(lambda _: self._release())  # finished, failed or cancelled while queued
        return fut

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, job: Job) -> Any:
        """Submit and await; if the awaiting request is cancelled, the job is told to stop."""
        fut = self.submit(job)
        try:  # shield: cancelling the awaiting task must not cancel the queued job (it stops via its flag)
            return await asyncio.shield(asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    def _run(self, job: Job) -> Any:
        """Worker thread: one generation, bounded by the job's deadline and cancel flag."""
        if job.cancelled.is_set():
            raise CancelledJobError("The request was cancelled before it started.")
        if time.monotonic() > job.deadline:
            self.metrics.count("timeouts")
            raise QueueTimeoutError(f"The request waited in the queue longer than its timeout "
                                    f"({self.timeout_s:g} s) and was not started.")
        job.started = time.monotonic()

        def on_token(trace) -> bool:
            if job.on_token is not None:
                job.on_token(trace)
            if job.cancelled.is_set():
                return False
            if time.monotonic() > job.deadline:
                job.timed_out = True
                return False
            return True

        return self.generate_fn(job.prompt, job.max_new_tokens, monitors=job.monitors, on_token=on_token)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
