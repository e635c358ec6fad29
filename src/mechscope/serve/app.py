"""The FastAPI app of `mechscope serve`: monitored generation over HTTP, validated at the edge.

Every malformed request gets a 4xx JSON body `{"detail": "<one clear line>"}` and never reaches the model:
http.py parses bodies (415, 413, 400, 422); here the limits that depend on the settings and the model (422),
unknown monitors and routes (404), wrong methods (405) and the API key (401) are checked. Generation runs on the engine's worker thread (engine.py);
the event loop only parses, admits (429 + Retry-After when the queue is full) and awaits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from mechscope.errors import MechscopeError
from mechscope.serve.config import ServeConfig
from mechscope.serve.engine import CancelledJobError, Engine, Job, Metrics, QueueFullError, QueueTimeoutError
from mechscope.serve.http import (
    ApiError,
    BodyLimit,
    CountRequests,
    body_schema,
    error_response,
    field_errors,
    parse_body,
)
from mechscope.serve.page import PAGE
from mechscope.serve.registry import (
    DuplicateMonitorError,
    MonitorRegistry,
    UnknownMonitorError,
    alert_out,
    token_out,
)
from mechscope.serve.schemas import (
    AddMonitorRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    MetricsResponse,
    MonitorInfo,
    MonitorsChanged,
    Percentiles,
    QueueInfo,
)

API_KEY_HEADER = "X-API-Key"
RESIDUAL_WIDTH_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                        "hook_embed", "ln_final.hook_normalized")


def create_app(model, monitors: Sequence = (), config: ServeConfig | None = None,
               generate_fn: Callable[..., Any] | None = None) -> FastAPI:
    """The service app for a loaded model and monitors. `generate_fn(prompt, max_new_tokens, monitors=,
    on_token=)` defaults to `model.generate` (returning a monitor.MonitoredGeneration)."""
    cfg = config or ServeConfig()
    metrics = Metrics()
    registry = MonitorRegistry(monitors)
    if generate_fn is None:
        def generate_fn(prompt, max_new_tokens, monitors, on_token):
            return model.generate(prompt, max_new_tokens, monitors=monitors, on_token=on_token)
    engine = Engine(generate_fn, max_queue=cfg.max_queue, timeout_s=cfg.timeout_s, metrics=metrics)
    n_ctx = int(model.cfg.n_ctx)
    model.to_tokens("warm up")  # a fast tokenizer resets its padding / truncation state on its first call: do
    # that now, so later calls (the event loop counting prompt tokens while the worker generates) only read it
    model_name = str(getattr(model.cfg, "model_name", None) or "model")

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="mechscope serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Monitored generation: probes, SAE features and directions read per token.")
    app.state.engine, app.state.registry, app.state.metrics, app.state.config = engine, registry, metrics, cfg
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)

    # ------------------------------------------------------------------ errors: always {"detail": str}
    @app.exception_handler(ApiError)
    async def _apierror_response(request: Request, e: ApiError):
        return error_response(e.status, e.detail, e.headers, e.errors)

    @app.exception_handler(RequestValidationError)
    async def _validationerror_response(request: Request, e: RequestValidationError):
        detail, errors = field_errors(e.errors())
        return error_response(422, detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _httperror_response(request: Request, e: StarletteHTTPException):
        detail = str(e.detail)
        if e.status_code == 404 and detail == "Not Found":
            detail = f"No route {request.method} {request.url.path}; see GET /openapi.json for the API."
        elif e.status_code == 405:
            detail = f"Method {request.method} is not allowed on {request.url.path}."
        return error_response(e.status_code, detail, getattr(e, "headers", None))

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get(API_KEY_HEADER)
        if got is None:
            raise ApiError(401, f"This endpoint needs the API key in the {API_KEY_HEADER} header.")
        if not hmac.compare_digest(got.encode("utf-8", "replace"), cfg.api_key.encode()):
            raise ApiError(401, f"Wrong API key in the {API_KEY_HEADER} header.")

    def queue_info() -> QueueInfo:
        return QueueInfo(pending=engine.pending, max_queue=cfg.max_queue, timeout_s=cfg.timeout_s)

    # ------------------------------------------------------------------ generation
    def admit(req: GenerateRequest) -> tuple[Job, int, list[str]]:
        """Limits that depend on the settings, the monitor snapshot, and the job (not yet submitted)."""
        if req.max_new_tokens > cfg.max_new_tokens:
            raise ApiError(422, f"max_new_tokens: at most {cfg.max_new_tokens} (the server's --max-new-tokens), "
                                f"got {req.max_new_tokens}.")
        if len(req.prompt) > 64 * cfg.max_prompt_tokens:  # far over any tokenisation: refuse before tokenising
            raise ApiError(422, f"prompt: {len(req.prompt)} characters is over the limit of "
                                f"{cfg.max_prompt_tokens} tokens (the server's --max-prompt-tokens).")
        try:
            req.prompt.encode("utf-8")
            n_prompt = int(model.to_tokens(req.prompt).shape[-1])
        except (UnicodeError, MechscopeError, ValueError, TypeError) as e:
            raise ApiError(422, f"prompt: cannot be tokenized ({type(e).__name__}: {str(e)[:120]}).") from None
        if n_prompt > cfg.max_prompt_tokens:
            raise ApiError(422, f"prompt: {n_prompt} tokens is over the limit of {cfg.max_prompt_tokens} "
                                f"(the server's --max-prompt-tokens).")
        if n_prompt + req.max_new_tokens > n_ctx:
            raise ApiError(422, f"prompt ({n_prompt} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the "
                                f"model's context of {n_ctx} tokens.")
        try:
            mons = registry.select(req.monitors)
        except UnknownMonitorError as e:
            raise ApiError(404, str(e)) from None
        except DuplicateMonitorError as e:
            raise ApiError(422, str(e)) from None
        job = Job(req.prompt, req.max_new_tokens, mons, deadline=time.monotonic() + cfg.timeout_s)
        return job, n_prompt, [str(m.name) for m in mons]

    def submit(job: Job):
        try:
            return engine.submit(job)
        except QueueFullError as e:
            raise ApiError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None

    def failure(e: BaseException) -> ApiError:
        """A job's exception as the ApiError its request gets (only that request)."""
        if isinstance(e, QueueTimeoutError):
            return ApiError(503, str(e), headers={"Retry-After": str(engine.retry_after())})
        if isinstance(e, CancelledJobError):
            return ApiError(499, str(e))
        if isinstance(e, CancelledError):  # the worker pool was shut down under the job
            return ApiError(503, "The service is shutting down; retry.", headers={"Retry-After": "5"})
        if isinstance(e, MechscopeError):
            return ApiError(422, f"{type(e).__name__}: {e}")
        metrics.count("errors")
        return ApiError(500, f"Generation failed ({type(e).__name__}): {str(e)[:300]}")

    def respond(job: Job, res, n_prompt: int, names: list[str], t0: float) -> GenerateResponse:
        end = time.monotonic()
        trace = [token_out(t) for t in getattr(res, "trace", [])]
        alerts = [alert_out(a) for a in getattr(res, "alerts", [])]
        text = res.text if hasattr(res, "text") else str(res)
        stopped_by = "timeout" if job.timed_out else getattr(res, "stopped_by", None)
        n_tokens = sum(t.token is not None for t in trace) if trace else 0
        wait = (job.started or end) - t0
        metrics.generation(end - t0, wait, n_tokens, [a.monitor for a in alerts], job.timed_out)
        return GenerateResponse(text=text, prompt=job.prompt, trace=trace, alerts=alerts, stopped_by=stopped_by,
                                monitors=names, n_tokens=n_tokens, prompt_tokens=n_prompt, latency_s=end - t0,
                                queue_wait_s=wait, timed_out=job.timed_out)

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 429, 503)}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=errors, openapi_extra=body_schema(GenerateRequest))
    async def generate(request: Request):
        """Generate with monitors; the whole trace in one JSON response."""
        req = await parse_body(request, GenerateRequest)
        job, n_prompt, names = admit(req)
        t0 = time.monotonic()
        fut = submit(job)
        try:  # the worker honours the deadline between tokens; this bound also covers one stuck step
            res = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)),
                                         cfg.timeout_s + max(5.0, cfg.timeout_s / 2))
        except asyncio.TimeoutError:
            job.cancelled.set()
            raise ApiError(503, f"The request did not finish within its timeout ({cfg.timeout_s:g} s).",
                           headers={"Retry-After": str(engine.retry_after())}) from None
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except Exception as e:  # noqa: BLE001 (mapped to this request's status)
            raise failure(e) from None
        return respond(job, res, n_prompt, names, t0)

    @app.post("/v1/generate/stream", responses=errors, openapi_extra=body_schema(GenerateRequest))
    async def generate_stream(request: Request):
        """Server-sent events: `start`, one `token` per step (token, scores, fired), then `done` (the same
        JSON as /v1/generate) or `error` ({"detail", "status"})."""
        req = await parse_body(request, GenerateRequest)
        job, n_prompt, names = admit(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:  # worker thread -> event loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed (shutdown): nobody is listening
                pass

        job.on_token = lambda t: put(("token", token_out(t)))
        t0 = time.monotonic()
        fut = submit(job)
        fut.add_done_callback(lambda f: put(("done", f)))

        def sse(event: str, data) -> str:
            payload = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
            return f"event: {event}\ndata: {payload}\n\n"

        async def events():
            try:
                yield sse("start", {"monitors": names, "prompt_tokens": n_prompt, "max_new_tokens": req.max_new_tokens})
                while True:
                    kind, item = await queue.get()
                    if kind == "token":
                        yield sse("token", item)
                        continue
                    try:
                        res = item.result()
                    except (Exception, CancelledError) as e:  # noqa: BLE001 (cancelled: server shutdown)
                        err = failure(e)
                        yield sse("error", {"detail": err.detail, "status": err.status})
                    else:
                        yield sse("done", respond(job, res, n_prompt, names, t0))
                    return
            finally:
                job.cancelled.set()  # a client that went away stops the generation at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ monitors
    @app.get("/v1/monitors", response_model=list[MonitorInfo])
    async def list_monitors():
        return registry.infos()

    @app.post("/v1/monitors", response_model=MonitorsChanged, status_code=201, responses=errors,
              openapi_extra=body_schema(AddMonitorRequest))
    async def add_monitors(request: Request):
        """Load monitors from a saved monitors file (on the server's disk), or add an inline direction monitor."""
        check_key(request)
        req = await parse_body(request, AddMonitorRequest)
        new = await asyncio.to_thread(_build_monitors, req, model)  # may read probe / SAE files
        taken = [str(m.name) for m in new if str(m.name) in registry.names()]
        if taken and not req.replace:
            raise ApiError(409, f"Monitor(s) {taken} are already loaded; DELETE /v1/monitors/{{name}} first, or "
                                f'pass "replace": true.')
        # a one-token trial generation (on the worker, like any request) catches what only a forward shows,
        # e.g. a direction whose width is not the hook's, before the monitor can fail real requests
        trial = Job("Hello", 1, list(new), deadline=time.monotonic() + cfg.timeout_s)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(submit(trial))), cfg.timeout_s + 5)
        except asyncio.TimeoutError:
            trial.cancelled.set()
            raise ApiError(503, "The trial run of the new monitor(s) did not finish in time; retry.",
                           headers={"Retry-After": str(engine.retry_after())}) from None
        except Exception as e:  # noqa: BLE001
            err = failure(e)
            if err.status in (422, 500):
                raise ApiError(422, f"The monitor(s) fail on this model: {err.detail}") from None
            raise err from None
        try:
            added = registry.add(new, replace=req.replace)
        except DuplicateMonitorError as e:
            raise ApiError(409, str(e)) from None
        return MonitorsChanged(added=added, monitors=registry.infos())

    @app.delete("/v1/monitors/{name}", response_model=MonitorsChanged, responses=errors)
    async def delete_monitor(name: str, request: Request):
        check_key(request)
        try:
            registry.remove(name)
        except UnknownMonitorError as e:
            raise ApiError(404, str(e)) from None
        return MonitorsChanged(removed=[name], monitors=registry.infos())

    # ------------------------------------------------------------------ health, metrics, page
    @app.get("/health", response_model=HealthResponse)
    async def health():
        return HealthResponse(model=model_name, n_layers=int(model.cfg.n_layers), d_model=int(model.cfg.d_model),
                              n_ctx=n_ctx, monitors=registry.names(), queue=queue_info(),
                              limits={"max_prompt_tokens": cfg.max_prompt_tokens,
                                      "max_new_tokens": cfg.max_new_tokens, "max_body_bytes": cfg.max_body_bytes})

    @app.get("/metrics", response_model=MetricsResponse)
    async def get_metrics():
        return MetricsResponse(**metrics.snapshot(), latency_s=Percentiles(**metrics.percentiles("latencies")),
                               queue_wait_s=Percentiles(**metrics.percentiles("queue_waits")), queue=queue_info())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE)

    # ------------------------------------------------------------------ attribution-graph explorer (--graphs DIR)
    def graph_file(name: str):
        from mechscope.circuits.graphs import UnknownGraphError, graph_path

        if cfg.graphs is None:
            raise ApiError(404, "This server serves no graphs: start it with --graphs DIR (the --out folder of "
                                "`mechscope graph`).")
        try:
            return graph_path(cfg.graphs, name)
        except UnknownGraphError as e:
            raise ApiError(404, str(e)) from None

    @app.get("/graph", include_in_schema=False)
    async def list_graphs():
        if cfg.graphs is None:
            graph_file("")  # the 404 that says how to serve graphs
        from pathlib import Path

        return {"graphs": sorted(p.stem for p in Path(cfg.graphs).glob("*.json")
                                 if not p.name.endswith(".details.json") and p.name != "graph-metadata.json")}

    @app.get("/graph/{name}", response_class=HTMLResponse, include_in_schema=False)
    async def graph_page(name: str):
        from mechscope.circuits.graphs import served_explorer

        graph_file(name)
        try:
            html = await asyncio.to_thread(served_explorer, cfg.graphs, name, save_url=f"/graph/{name}")
        except MechscopeError as e:  # a corrupt or foreign graph file
            raise ApiError(422, f"Graph {name!r} cannot be shown: {e}") from None
        return HTMLResponse(html)

    @app.post("/graph/{name}", status_code=204, include_in_schema=False)
    async def save_graph(name: str, request: Request):
        """The explorer saves pins and supernodes back (API-key protected, like every mutation)."""
        from mechscope.circuits.graphs import save_posted_graph

        check_key(request)
        path = graph_file(name)
        body = await request.body()
        try:
            await asyncio.to_thread(save_posted_graph, body, path)
        except MechscopeError as e:
            raise ApiError(422, f"Not saved: {e}") from None
        return Response(status_code=204)

    return app


def _build_monitors(req: AddMonitorRequest, model) -> list:
    """The monitors an AddMonitorRequest describes (typed monitor errors become 422 / 404)."""
    from mechscope import monitor

    if sum(x is not None for x in (req.file, req.spec, req.kind)) != 1:
        raise ApiError(422, 'Send one of "file" (a saved monitors file), "spec" (one monitor spec as in '
                            'monitors.json) or "kind": "direction" with its fields.')
    if req.spec is not None:
        extra = [k for k in ("names", "name", "hook", "direction", "threshold") if getattr(req, k) is not None]
        if extra:
            raise ApiError(422, f'Fields {extra} go inside "spec", not next to it.')
        try:
            return [monitor.monitor_from_json(req.spec, model)]
        except (MechscopeError, KeyError, ValueError, TypeError, OSError) as e:
            raise ApiError(422, f"Bad monitor spec: {type(e).__name__}: {str(e)[:300]}") from None
    if req.file is not None:
        extra = [k for k in ("name", "hook", "direction", "threshold") if getattr(req, k) is not None]
        if extra:
            raise ApiError(422, f'Fields {extra} belong to an inline monitor ("kind"), not to "file".')
        if not os.path.exists(req.file):
            raise ApiError(404, f"No monitors file or folder at {req.file!r} on the server.")
        try:
            loaded = list(monitor.load_monitors(req.file, model))
        except FileNotFoundError:
            raise ApiError(404, f"No monitors file at {req.file!r} on the server.") from None
        except (MechscopeError, OSError, ValueError) as e:
            raise ApiError(422, f"Cannot load monitors from {req.file!r}: {type(e).__name__}: {e}") from None
        if req.names is not None:
            have = {str(m.name): m for m in loaded}
            missing = [n for n in req.names if n not in have]
            if missing:
                raise ApiError(404, f"Monitors {missing} are not in {req.file!r}; it holds {list(have)}.")
            loaded = [have[n] for n in req.names]
        return loaded
    missing = [k for k in ("name", "hook", "direction", "threshold") if getattr(req, k) is None]
    if missing:
        raise ApiError(422, f"An inline direction monitor needs {missing}.")
    if req.names is not None:
        raise ApiError(422, '"names" selects monitors of a "file"; an inline monitor has "name".')
    if not req.hook.endswith(RESIDUAL_WIDTH_HOOKS):
        raise ApiError(422, f"hook: inline direction monitors read residual-width hooks (names ending in "
                            f"{', '.join(RESIDUAL_WIDTH_HOOKS)}), got {req.hook!r}; save other monitors to a file.")
    d_model = int(model.cfg.d_model)
    if len(req.direction) != d_model:
        raise ApiError(422, f"direction: has {len(req.direction)} values; the model's d_model is {d_model} "
                            f"(inline direction monitors read residual-width hooks).")
    import torch

    direction = torch.tensor(req.direction, dtype=torch.float32)  # [d_model]
    if not bool(direction.norm() > 0):
        raise ApiError(422, "direction: is all zeros; a direction needs a non-zero norm.")
    try:
        m = monitor.DirectionMonitor(req.name, req.hook, direction, threshold=req.threshold, window=req.window,
                                     hysteresis=req.hysteresis, action=req.action, scope=req.scope)
        m.check(model)  # an unknown hook fails here, not in every later generation
        return [m]
    except (MechscopeError, KeyError, ValueError, TypeError) as e:
        raise ApiError(422, f"Bad direction monitor: {type(e).__name__}: {str(e)[:300]}") from None
