"""Engine events on asyncio: the bridge ChatModel uses, and an in-process `Backend` for the API.

`stream_events` turns one request into an async iterator of engine events (start, token...,
done | error); closing the iterator early cancels the request, which frees its batch slot.
`EngineBackend` serves the HTTP API straight from an `Engine` in the same process (no Ray): handy
for embedding and for tests of API behaviour that does not need Serve.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .engine import Engine, NotReady, QueueFull


async def stream_events(engine: Engine, request: dict) -> AsyncIterator[dict]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    try:
        params = engine.resolve_params(**(request.get("params") or {}))
        ticket = engine.submit(request["messages"], params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    except (QueueFull, NotReady) as err:
        yield {"type": "error", "status": 503, "message": str(err)}
        return
    except (KeyError, TypeError, ValueError) as err:
        yield {"type": "error", "status": 422, "message": f"bad request: {err}"}
        return
    try:
        while True:
            ev = await queue.get()
            # A slow reader gets the tokens that piled up as one chunk.
            while ev["type"] == "token" and not queue.empty():
                nxt = queue.get_nowait()
                if nxt["type"] != "token":
                    yield ev
                    ev = nxt
                    break
                ev = {"type": "token", "text": ev["text"] + nxt["text"]}
            yield ev
            if ev["type"] in ("done", "error"):
                return
    finally:
        if not ticket.done:
            ticket.cancel()


async def complete(engine: Engine, request: dict) -> dict:
    """The whole answer: {"start": start event or None, "end": done or error event}."""
    start = None
    events = stream_events(engine, request)
    try:
        async for ev in events:
            if ev["type"] == "start":
                start = ev
            elif ev["type"] in ("done", "error"):
                return {"start": start, "end": ev}
    finally:
        await events.aclose()
    return {"start": start, "end": {"type": "error", "status": 500, "message": "the generation ended without a result"}}


class EngineBackend:
    """`api.Backend` over an in-process Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def stream(self, request: dict) -> AsyncIterator[dict]:
        return stream_events(self.engine, request)

    async def complete(self, request: dict) -> dict:
        return await complete(self.engine, request)

    async def status(self) -> dict:
        return self.engine.status()
