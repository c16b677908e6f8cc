"""The middleware in front of every route: request metrics, the body-size cap, the optional API key."""

from __future__ import annotations

import hmac
import time

from ..config import ServeSettings
from ..state import Metrics
from .responses import ApiError, json_error

PUBLIC = ("/healthz", "/readyz", "/", "/favicon.ico")


def is_public(path: str) -> bool:
    """Health checks and static page shells (they hold no data and ask for the key themselves)."""
    return path in PUBLIC or path.startswith(("/static/", "/dashboard/")) or path == "/dashboard"


class Guard:
    """Pure ASGI middleware (a streamed answer is measured to its last byte, not its headers)."""

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
        if scope.get("method") != "OPTIONS":  # CORS preflights carry no key
            err = self._check(path, headers)
        if err is not None:
            return await json_error(err)(scope, receive, send_wrapped)
        return await self.app(scope, receive, send_wrapped)

    def _check(self, path: str, headers: dict[str, str]) -> ApiError | None:
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return ApiError(413, f"request body over {self.settings.max_body_bytes} bytes", code="body_too_large")
        if self.api_key and not is_public(path):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>' or "
                                "'X-API-Key: <key>'", "authentication_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        return None
