"""The HTTP API (FastAPI), independent of Ray: `build_api(backend, settings)`.

`backend` is anything with `stream(request) -> async iterator of engine events`,
`complete(request) -> done/error event` and `status() -> dict`; in Ray Serve it wraps the ChatModel
deployment handle (see app.py). A request is `{"messages": [...], "params": {...}}`; events are
`start`, `token`, `done` and `error` dicts (see engine.py).

Every answer names the checkpoint that produced it: `checkpoint` in the JSON body (`model` and
`system_fingerprint` on the OpenAI routes) and the `X-Model-Checkpoint` header.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..basemodel import cache_root
from ..feedback import answer_mac
from .config import RequestModels, ServeSettings
from .safety import load_filter
from .state import LRU, Conversations, FeedbackStore, Metrics, RateLimiter

log = logging.getLogger(__name__)
WEB = Path(__file__).parent / "web"
PUBLIC = ("/healthz", "/readyz", "/", "/favicon.ico")
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _public(path: str) -> bool:
    """Health checks and static page shells (they hold no data and ask for the key themselves)."""
    return path in PUBLIC or path.startswith(("/static/", "/dashboard/")) or path == "/dashboard"


class Backend(Protocol):
    def stream(self, request: dict) -> AsyncIterator[dict]: ...
    async def complete(self, request: dict) -> dict: ...  # {"start": event | None, "end": done/error event}
    async def status(self) -> dict: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code or str(status)}}


def _json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.type, err.param, err.code), err.status,
                        headers=err.headers)


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Guard:
    """Pure ASGI middleware: metrics for every response, body-size cap, and the optional API key."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics, api_key: str | None):
        self.app, self.settings, self.metrics, self.api_key = app, settings, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = scope.get("path", ""), time.monotonic(), {"code": 500}
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a route prefix (Serve's root_path)
            path = path[len(root):] or "/"

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                route = self.metrics.route(path)
                self.metrics.requests.labels(route, str(status["code"])).inc()
                self.metrics.latency.labels(route).observe(time.monotonic() - t0)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = None
        if scope.get("method") != "OPTIONS":
            err = self._check(path, headers)
        if err is not None:
            return await _json_error(err)(scope, receive, send_wrapped)
        return await self.app(scope, receive, send_wrapped)

    def _check(self, path: str, headers: dict[str, str]) -> ApiError | None:
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return ApiError(413, f"request body over {self.settings.max_body_bytes} bytes", code="body_too_large")
        if self.api_key and not _public(path):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>' or "
                                "'X-API-Key: <key>'", "authentication_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        return None


def new_nonce() -> str:
    """The first part of a response id."""
    return uuid.uuid4().hex[:16]


class Api:
    """Routes and their state; `app` is the FastAPI application."""

    def __init__(self, backend: Backend, settings: ServeSettings):
        import os

        self.backend, self.settings = backend, settings
        self.models = RequestModels(settings.max_message_chars, settings.engine.max_new_tokens_cap)
        self.metrics = Metrics()
        self.limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        self.conversations = Conversations(settings.history_turns, settings.max_conversations)
        self.answers = LRU(10_000)  # response_id -> what feedback refers to
        self.safety = load_filter(settings.safety_filter, settings.blocklist)
        self.inflight = 0
        self._status: tuple[float, dict] = (0.0, {})
        feedback_uri = settings.feedback_uri or f"file://{cache_root() / 'feedback'}"
        self.feedback = FeedbackStore(feedback_uri, endpoint=settings.storage_endpoint, region=settings.storage_region)
        api_key = settings.api_key or os.environ.get(settings.api_key_env) or None
        # Every ingress replica derives the same secret from the same settings.
        secret = os.environ.get(settings.feedback_secret_env) or f"{api_key or ''}\0{feedback_uri}"
        self.answer_secret = hashlib.sha256(b"selflearn-answers\0" + secret.encode()).digest()
        self.app = app = FastAPI(title="selflearn chat", version="1", docs_url="/docs", redoc_url=None)
        self._routes(app)
        self._errors(app)
        if settings.dashboard_dir:
            from fastapi.staticfiles import StaticFiles

            app.mount("/dashboard", StaticFiles(directory=settings.dashboard_dir, html=True), name="dashboard")
        if settings.extra_routes:
            import importlib

            module, _, attr = settings.extra_routes.partition(":")
            getattr(importlib.import_module(module), attr)(app, settings)
        app.add_middleware(Guard, settings=settings, metrics=self.metrics, api_key=api_key)
        if settings.cors_origins:
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                               expose_headers=["X-Model-Checkpoint", "Retry-After", "X-Response-Id"], max_age=600)

    # -- errors ----------------------------------------------------------------------------------
    def _errors(self, app: FastAPI) -> None:
        @app.exception_handler(ApiError)
        async def api_error(_: Request, err: ApiError):
            return _json_error(err)

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, err: RequestValidationError):
            errors = err.errors()

            def where(e: dict) -> str:
                if e.get("type") == "json_invalid":
                    return "body"
                return ".".join(str(p) for p in e["loc"] if p != "body") or "body"

            param = where(errors[0]) if errors else None
            msg = "; ".join(f"{where(e)}: {e['msg'].removeprefix('Value error, ')}" for e in errors)
            body = error_body(422, msg, "invalid_request_error", param or None, "invalid_value")
            body["detail"] = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
            return JSONResponse(body, 422)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: Request, err: StarletteHTTPException):
            return JSONResponse(error_body(err.status_code, str(err.detail), "invalid_request_error"),
                                err.status_code, headers=getattr(err, "headers", None))

    # -- helpers ---------------------------------------------------------------------------------
    def _client(self, request: Request) -> str:
        if self.settings.trust_forwarded_for and (fwd := request.headers.get("x-forwarded-for")):
            return fwd.split(",")[0].strip()
        return request.client.host if request.client else "unknown"

    def _admit(self, request: Request) -> None:
        wait = self.limiter.take(self._client(request))
        if wait > 0:
            self.metrics.rejected.labels("rate_limit").inc()
            raise ApiError(429, f"rate limit of {self.settings.rate_limit_per_minute:g} requests per minute "
                           f"exceeded; retry in {wait:.1f}s", "rate_limit_error", code="rate_limited",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        if self.inflight >= self.settings.max_inflight:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, f"server busy: {self.inflight} requests in flight", "server_busy",
                           code="queue_full", headers={"Retry-After": "1"})

    def _check_input(self, messages: list[dict]) -> None:
        for m in messages:
            if m["role"] == "assistant":
                continue
            verdict = self.safety.check_input(m["content"])
            if not verdict.allowed:
                self.metrics.rejected.labels("safety").inc()
                raise ApiError(400, f"blocked by the safety filter: {verdict.reason}", "content_filter",
                               code="content_filter")

    async def status(self, max_age: float = 1.0) -> dict:
        at, cached = self._status
        if time.monotonic() - at > max_age or not cached:
            cached = await asyncio.wait_for(self.backend.status(), 10)
            self._status = (time.monotonic(), cached)
            self.metrics.engine.status = cached
        return cached

    async def _events(self, req: dict) -> AsyncIterator[dict]:
        """Engine events under the request timeout; an `error` event on timeout. Counts in-flight."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        agen = self.backend.stream(req).__aiter__()
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            while True:
                left = deadline - time.monotonic()
                try:
                    ev = await asyncio.wait_for(agen.__anext__(), max(left, 0.001))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    yield {"type": "error", "status": 504,
                           "message": f"the request timed out after {self.settings.request_timeout_s:g}s"}
                    return
                except Exception as err:  # replica gone, back-pressure, transport errors
                    log.warning("model call failed: %s", err)
                    yield {"type": "error", "status": 503,
                           "message": f"the model is unavailable ({type(err).__name__}); retry shortly"}
                    return
                yield ev
                if ev["type"] in ("done", "error"):
                    if ev["type"] == "done":
                        self.metrics.observe_done(ev)
                    return
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            await agen.aclose()

    async def _first(self, events: AsyncIterator[dict]) -> dict:
        ev = await events.__anext__()
        if ev["type"] == "error":
            await events.aclose()
            raise self._engine_error(ev)
        return ev

    @staticmethod
    def _engine_error(ev: dict) -> ApiError:
        status = int(ev.get("status", 500))
        kind = {422: "invalid_request_error", 503: "server_busy", 504: "timeout"}.get(status, "server_error")
        headers = {"Retry-After": "1"} if status == 503 else None
        return ApiError(status, ev.get("message", "generation failed"), kind, headers=headers)

    async def _collect(self, req: dict) -> tuple[dict, dict]:
        """Run a request to the end without streaming: (start event, done event, output filtered)."""
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            res = await asyncio.wait_for(self.backend.complete(req), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request timed out after {self.settings.request_timeout_s:g}s", "timeout",
                           code="timeout") from None
        except Exception as err:  # replica gone, back-pressure, transport errors
            log.warning("model call failed: %s", err)
            raise ApiError(503, f"the model is unavailable ({type(err).__name__}); retry shortly", "server_busy",
                           headers={"Retry-After": "1"}) from None
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
        done = res["end"]
        if done["type"] == "error":
            raise self._engine_error(done)
        self.metrics.observe_done(done)
        verdict = self.safety.check_output(done["text"])
        if not verdict.allowed:
            done = {**done, "text": "", "finish_reason": "content_filter"}
        return res["start"], done

    def _remember(self, done: dict, messages: list[dict], cid: str | None, nonce: str | None = None) -> str:
        """A response id that signs the answer: feedback can name it to any replica, later. A
        stream names its answer before it exists: by `nonce` alone, which this replica also
        remembers, until its end gives the signed id."""
        nonce = nonce or new_nonce()
        prompt, reply = messages[-1]["content"], done.get("text", "")
        rid = nonce + answer_mac(self.answer_secret, nonce, done.get("checkpoint"), prompt, reply)
        answer = {"checkpoint": done.get("checkpoint"), "conversation_id": cid, "prompt": prompt, "reply": reply,
                  "finish_reason": done.get("finish_reason")}
        self.answers.put(rid, answer)
        self.answers.put(nonce, answer)
        return rid

    def answer_for(self, response_id: str, prompt: str | None, reply: str | None,
                   checkpoint: str | None) -> dict | None:
        """What a response id refers to: this replica's memory, else the answer the client sent
        back if the id signs it; None when neither."""
        if (known := self.answers.get(response_id)) is not None:
            return known
        if prompt is None or reply is None or len(response_id) != 36:
            return None
        nonce, mac = response_id[:16], response_id[16:]
        if not hmac.compare_digest(mac, answer_mac(self.answer_secret, nonce, checkpoint, prompt, reply)):
            return None
        return {"checkpoint": checkpoint, "prompt": prompt, "reply": reply}

    async def _stream_text(self, events: AsyncIterator[dict], on_token, on_done):
        """Relay token events through the output filter; stops the generation if it trips."""
        text = ""
        async for ev in events:
            if ev["type"] == "token":
                text += ev["text"]
                verdict = self.safety.check_output(text)
                if not verdict.allowed:
                    await events.aclose()
                    yield on_done({"type": "done", "finish_reason": "content_filter", "text": text,
                                   "usage": None, "checkpoint": None})
                    return
                yield on_token(ev["text"])
            elif ev["type"] == "done":
                yield on_done(ev)
            elif ev["type"] == "error":
                yield on_done(ev)

    # -- routes ----------------------------------------------------------------------------------
    def _routes(self, app: FastAPI) -> None:
        from .api_routes import register

        register(self, app, self.models)


def build_api(backend: Backend, settings: ServeSettings) -> FastAPI:
    return Api(backend, settings).app
