"""Engine events on asyncio: the bridge ChatModel uses, and an in-process `Backend` for the API.

`stream_events` turns one request into an async iterator of engine events (`Start`, `Token`...,
`Done` | `Error`); closing the iterator early cancels the request, which frees its batch slot.
`EngineBackend` serves the HTTP API straight from an `Engine` in the same process (no Ray): handy
for embedding and for tests of API behaviour that does not need Serve.
"""

from __future__ import annotations

import asyncio
from typing import AsyncGenerator

from ..contracts import END_EVENTS, Completion, Done, EngineEvent, EngineRequest, EngineStatus, Error, Start, Token
from .engine import Engine, NotReady, QueueFull


async def stream_events(engine: Engine, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
    def sink(ev: EngineEvent) -> None:  # called on the engine's scheduler thread
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    try:
        ticket = engine.submit(request, sink)
    except (QueueFull, NotReady) as err:
        yield Error(503, str(err))
        return
    try:
        while True:
            ev = await queue.get()
            # A slow reader gets the tokens that piled up as one chunk.
            while isinstance(ev, Token) and not queue.empty():
                nxt = queue.get_nowait()
                if not isinstance(nxt, Token):
                    yield ev
                    ev = nxt
                    break
                ev = Token(ev.text + nxt.text)
            yield ev
            if isinstance(ev, END_EVENTS):
                return
    finally:
        if not ticket.done:
            ticket.cancel()


async def complete(engine: Engine, request: EngineRequest) -> Completion:
    """The whole answer: its Start event (None if it never got a slot) and its Done or Error."""
    start = None
    events = stream_events(engine, request)
    try:
        async for ev in events:
            if isinstance(ev, Start):
                start = ev
            elif isinstance(ev, (Done, Error)):
                return Completion(start, ev)
    finally:
        await events.aclose()
    return Completion(start, Error(500, "the generation ended without a result"))


class EngineBackend:
    """`http.service.Backend` over an in-process Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        return stream_events(self.engine, request)

    async def complete(self, request: EngineRequest) -> Completion:
        return await complete(self.engine, request)

    async def status(self) -> EngineStatus:
        return self.engine.status()
