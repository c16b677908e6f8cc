"""Test support: the engine without Ray, through its public API (`Engine.submit` and the events it
sends), and the HTTP API over it in-process (uvicorn on 127.0.0.1 in a thread)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from selflearn.contracts import Done, EngineEvent, EngineRequest, Error, RequestParams
from selflearn.serving.batch import Ticket
from selflearn.serving.engine import Engine
from tests.support.waiting import wait_until


def ask(text: str, **params: Any) -> EngineRequest:
    """One user message with `RequestParams` (max_new_tokens=..., temperature=..., stop=(...), ...)."""
    return EngineRequest(({"role": "user", "content": text},), RequestParams(**params))


@dataclass
class Run:
    """One submitted request: the events so far, set `ended` once `Done` or `Error` arrived."""

    ticket: Ticket | None = None
    events: list[EngineEvent] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    def take(self, ev: EngineEvent) -> None:
        self.events.append(ev)
        if isinstance(ev, (Done, Error)):
            self.ended.set()

    @property
    def end(self) -> Done | Error:
        ev = self.events[-1]
        assert isinstance(ev, (Done, Error)), ev
        return ev


def submit(engine: Engine, request: EngineRequest) -> Run:
    """Queue `request`; its events gather in the returned `Run` (QueueFull and NotReady propagate)."""
    run = Run()
    run.ticket = engine.submit(request, run.take)
    return run


def generate(engine: Engine, request: EngineRequest, timeout: float = 120) -> Done:
    """The request's `Done` event; AssertionError for an `Error` or no end within `timeout`."""
    run = submit(engine, request)
    assert run.ended.wait(timeout), f"no answer after {timeout:g} s: {run.events}"
    assert isinstance(run.end, Done), run.end
    return run.end


@contextlib.contextmanager
def serve_api(app: Any, **uvicorn_config: Any) -> Iterator[str]:
    """An ASGI app (`build_api(...)`) served by uvicorn on a free port (`uvicorn_config`: more of
    uvicorn.Config's options); its base URL."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=30, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
