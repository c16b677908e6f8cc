"""What the HTTP API writes besides its answers: errors (OpenAI's shape) and SSE framing.

Every error is `{"error": {"message", "type", "param", "code"}}` with the status it names, whatever
raised it: an `ApiError` from a route, FastAPI's request validation, Starlette's 404/405, or an
engine `Error` event.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...contracts import Error, Source
from ...validation import ErrorDetails, field_path, one_line

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer a stream
SSE_DONE = b"data: [DONE]\n\n"  # the OpenAI stream's last line


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.type, self.param, self.code)


def error_body(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code or str(status)}}


def json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)


# The error type a client sees for the status an engine Error event carries.
_ENGINE_ERROR_TYPES = {422: "invalid_request_error", 503: "server_busy", 504: "timeout"}


def engine_error(ev: Error, fields: Mapping[str, str] | None = None) -> ApiError:
    """An engine `Error` event as the HTTP error that answers the request (busy: retry in a second).

    The event names the field it is about in the engine request's terms (`messages`); `fields`
    renames it to the route's own body field (`/chat` takes one `message`)."""
    headers = {"Retry-After": "1"} if ev.status == 503 else None
    param = (fields or {}).get(ev.param, ev.param) if ev.param else None
    code = ev.code or ("timeout" if ev.status == 504 else None)
    return ApiError(ev.status, ev.message, _ENGINE_ERROR_TYPES.get(ev.status, "server_error"), param=param,
                    code=code, headers=headers)


def sources_json(sources: tuple[Source, ...]) -> list[dict[str, str]]:
    """What an answer read in the checkpoint's memory, as every route shows it: title, url and the
    checkpoint that learned it ([] when it read nothing)."""
    return [{"title": s.title, "url": s.url, "checkpoint": s.checkpoint} for s in sources]


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: an optional `event:` line and the data as one JSON line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _request_field(error: ErrorDetails) -> str:
    """The field a request validation error is about, as the error's `param`: a body field by its
    path, a body that is not JSON as `body`."""
    if error.get("type") == "json_invalid":
        return "body"
    return field_path(error, skip=("body",), default="body")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return json_error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        errors = err.errors()
        param = _request_field(errors[0]) if errors else None
        body = error_body(422, one_line(errors, _request_field), "invalid_request_error", param or None,
                          "invalid_value")
        # FastAPI's own `detail` as well, for clients written against it.
        body["detail"] = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        return JSONResponse(body, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail), "invalid_request_error"),
                            err.status_code, headers=getattr(err, "headers", None))
