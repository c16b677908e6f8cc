"""The middleware in front of every route: request metrics, the body-size cap, the optional API key;
and who the client is (the connection's peer, or the client a trusted proxy names)."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ServeSettings
from ..state import Metrics
from .responses import ApiError, json_error

PUBLIC = ("/healthz", "/readyz", "/", "/favicon.ico")


def is_public(path: str) -> bool:
    """Health checks and static page shells (they hold no data and ask for the key themselves)."""
    return path in PUBLIC or path.startswith(("/static/", "/dashboard/")) or path == "/dashboard"


def body_too_large(cap: int) -> ApiError:
    # Closing the connection stops the upload: kept open, the server would have to read (and throw
    # away) the rest of the body before the next request on it.
    return ApiError(413, f"request body over {cap} bytes", code="body_too_large", headers={"Connection": "close"})


class Guard:
    """Pure ASGI middleware (a streamed answer is measured to its last byte, not its headers)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics, api_key: str | None):
        self.app, self.settings, self.metrics, self.api_key = app, settings, metrics, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a route prefix (Serve's root_path)
            path = path[len(root):] or "/"
        exchange = _Exchange(scope, receive, send, cap=self.settings.max_body_bytes, metrics=self.metrics,
                             route=self.metrics.route(path))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = None
        if scope.get("method") != "OPTIONS":  # CORS preflights carry no key
            err = self._check(path, headers)
        if err is not None:
            return await json_error(err)(scope, receive, exchange.send)
        return await self.app(scope, exchange.receive, exchange.send)

    def _check(self, path: str, headers: dict[str, str]) -> ApiError | None:
        # An honest Content-Length over the cap is refused before a byte is read; the body itself
        # is counted as it streams in (`_Exchange.receive`), for chunked bodies and lying lengths.
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return body_too_large(self.settings.max_body_bytes)
        if self.api_key and not is_public(path):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>' or "
                                "'X-API-Key: <key>'", "authentication_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        return None


class _Exchange:
    """One HTTP request through the guard: its body counted as it arrives, its response measured.

    The moment the body passes the cap the guard answers 413 itself and tells the app the client
    has gone (`http.disconnect`), so no route ever holds more than the cap plus one chunk. Raising
    instead would not do: FastAPI turns any error while reading a body into its own 400.
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send, *, cap: int, metrics: Metrics, route: str):
        self.scope, self._receive, self._send = scope, receive, send
        self.cap, self.metrics, self.route = cap, metrics, route
        self.t0, self.status = time.monotonic(), 500
        self.received = 0  # body bytes so far
        self.started = False  # a response has started
        self.refused = False  # answered 413 mid-body: what the app sends after that is dropped

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.cap:
                if not self.started:
                    await json_error(body_too_large(self.cap))(self.scope, self._receive, self._emit)
                self.refused = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if not self.refused:
            await self._emit(message)

    async def _emit(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.metrics.requests.labels(self.route, str(self.status)).inc()
            self.metrics.latency.labels(self.route).observe(time.monotonic() - self.t0)


# -- who is asking -----------------------------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP in an address as peers and proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `::1`."""
    value = value.strip()
    if value.startswith("[") and "]" in value:
        value = value[1:value.index("]")]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # a dual-stack socket's IPv4 peer
        return ip.ipv4_mapped
    return ip


class ProxyTrust:
    """Whose `X-Forwarded-For` is believed: `trusted_proxies` (IPs/CIDRs), or everyone with
    `trust_forwarded_for` (the old switch, kept: only right behind a proxy that overwrites the header)."""

    def __init__(self, networks: tuple[Network, ...] = (), everyone: bool = False):
        self.networks, self.everyone = networks, everyone

    def trusts(self, host: str | None) -> bool:
        if self.everyone:
            return True
        ip = _address(host) if host else None
        return ip is not None and any(ip in net for net in self.networks)

    def client(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client of a request from `peer` carrying `forwarded_for` (the X-Forwarded-For values,
        comma-joined). From an untrusted peer the header means nothing: anyone can write one. From
        a trusted proxy: the nearest address in the chain that is not itself a trusted proxy (each
        proxy appends the peer it saw, so what lies left of that could be forged by the client);
        with `everyone`, the first address, as before."""
        hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
        if not hops or not self.trusts(peer):
            return peer or "unknown"
        client = hops[0] if self.everyone else next((h for h in reversed(hops) if not self.trusts(h)), hops[0])
        ip = _address(client)  # one client, whichever port it came from
        return str(ip) if ip is not None else client


@functools.lru_cache(maxsize=16)
def _proxy_trust(networks: tuple[str, ...], everyone: bool) -> ProxyTrust:
    return ProxyTrust(tuple(ipaddress.ip_network(n, strict=False) for n in networks), everyone)


def proxy_trust(settings: ServeSettings) -> ProxyTrust:
    """The settings' `ProxyTrust` (built once per distinct setting; `trusted_proxies` is validated by
    `ServeSettings`)."""
    return _proxy_trust(tuple(settings.trusted_proxies), settings.trust_forwarded_for)
