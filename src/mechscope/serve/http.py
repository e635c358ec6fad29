"""HTTP plumbing of the service: one error shape, the body-size limit, request counting, body parsing.

Every error leaves as `{"detail": "<one line>"}` (plus the field `errors` of a 422). Bodies are parsed here
rather than by FastAPI's implicit body handling, so each way a body can be wrong has its own status and
message: 415 wrong content type, 413 too large, 400 not JSON, 422 not an object / wrong fields.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from mechscope.serve.engine import Metrics
from mechscope.serve.schemas import ErrorResponse

log = logging.getLogger("mechscope.serve")


class ApiError(Exception):
    """An HTTP error with a one-line message (and optional headers, e.g. Retry-After)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None,
                 errors: list[dict] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.errors = status, detail, headers, errors


def error_response(status: int, detail: str, headers=None, errors=None) -> JSONResponse:
    body = ErrorResponse(detail=detail, errors=errors).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


def short_repr(x: Any, n: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."


def field_errors(errors: Sequence[dict]) -> tuple[str, list[dict]]:
    """pydantic errors -> ('prompt: Field required; max_new_tokens: ...', [{loc, msg, type}]) (JSON-safe)."""
    clean, parts = [], []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        msg = str(e.get("msg", "invalid"))
        if e.get("type") not in ("missing", "extra_forbidden") and "input" in e:
            msg += f" (got {short_repr(e['input'])})"
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; see the API's request models)"
        parts.append(f"{where}: {msg}")
        clean.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
    return "; ".join(parts[:8]) + (f"; ... ({len(parts)} errors)" if len(parts) > 8 else ""), clean


class BodyLimit:
    """ASGI middleware: 413 for a Content-Length over the limit; a streamed body that grows past it raises
    ApiError(413) from receive(), i.e. inside the endpoint that reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0 or n > self.max_bytes:
                status, detail = ((413, f"Request body of {n} bytes is over the limit of {self.max_bytes} bytes.")
                                  if n > self.max_bytes else (400, "Invalid Content-Length header."))
                return await error_response(status, detail)(scope, receive, send)
        seen = 0
        limit = self.max_bytes

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise ApiError(413, f"Request body is over the limit of {limit} bytes.")
            return msg

        return await self.app(scope, limited, send)


class CountRequests:
    """ASGI middleware: count every response by method, route template and status (for /metrics), and turn an
    unexpected exception (a bug) into a 500 JSON body for that request alone, logged, the connection kept."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def recording(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, recording)
        except Exception as e:  # noqa: BLE001 (anything that escaped the handlers)
            log.exception("error while serving %s %s", scope.get("method"), scope.get("path"))
            if status[0] == 0:
                await error_response(500, f"Internal error ({type(e).__name__}): {str(e)[:300]}")(scope, receive, recording)
            else:
                status[0] = status[0] or 500
        finally:
            route = scope.get("route")
            self.metrics.request(scope.get("method", "?"), getattr(route, "path", "unmatched"), status[0] or 500)


def body_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of an endpoint that parses its body itself (see _parse)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Content type, JSON and schema checks of a request body, each with its own status and message."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}.")
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "The request body is empty; send a JSON object.")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, f"The request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"The request body must be a JSON object, got a JSON {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        detail, errors = field_errors(e.errors(include_url=False))
        raise ApiError(422, detail, errors=errors) from None
