"""A real HTTP server on 127.0.0.1 that replays recorded responses, for the source tests.

Each path has a queue of scripted replies (consumed in order) and an optional fallback that
builds a reply from the request. Every request is recorded with its arrival time and headers,
so a test can check what a remote server would have seen: how many tries, how far apart, which
User-Agent.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict | list = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json; charset=utf-8"
    delay: float = 0.0  # seconds to sleep before answering (a slow server, a timeout)

    def payload(self) -> bytes:
        if isinstance(self.body, (dict, list)):
            return json.dumps(self.body, ensure_ascii=False).encode("utf-8")
        return self.body.encode("utf-8") if isinstance(self.body, str) else self.body


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    t: float  # time.monotonic() at arrival

    def param(self, name: str) -> str | None:
        v = self.query.get(name)
        return v[0] if v else None


class ReplayServer:
    def __init__(self) -> None:
        self._queues: dict[str, deque[Reply]] = defaultdict(deque)
        self._fallbacks: dict[str, Callable[[Seen], Reply]] = {}
        self._lock = threading.Lock()
        self.requests: list[Seen] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls on keep-alive

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                seen = Seen("GET", parts.path, parse_qs(parts.query), {k: v for k, v in self.headers.items()},
                            time.monotonic())
                reply = server._next(seen)
                if reply.delay:
                    time.sleep(reply.delay)
                body = reply.payload()
                try:
                    self.send_response(reply.status)
                    if reply.status != 304:
                        self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test): nothing to answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def script(self, path: str, *replies: Reply) -> "ReplayServer":
        with self._lock:
            self._queues[path].extend(replies)
        return self

    def fallback(self, path: str, fn: Callable[[Seen], Reply]) -> "ReplayServer":
        self._fallbacks[path] = fn
        return self

    def hits(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def _next(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            queue = self._queues.get(seen.path)
            if queue:
                return queue.popleft()
        fn = self._fallbacks.get(seen.path)
        if fn is not None:
            return fn(seen)
        return Reply(404, {"type": "https://mediawiki.org/wiki/HyperSwitch/errors/not_found",
                           "title": "Not found.", "method": "get", "uri": seen.path})

    def __enter__(self) -> "ReplayServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
