"""The chat page and the seed's chat API: POST /chat (one JSON answer) and /chat/stream (SSE).

Both remember the conversation (`conversation_id`) and name the answer (`response_id`, for
feedback) and the checkpoint that wrote it (`checkpoint`, the `X-Model-Checkpoint` header).

No `from __future__ import annotations` here: FastAPI must see the request classes built per
settings (`RequestModels`) as real objects, not strings.
"""

import dataclasses
from pathlib import Path
from typing import AsyncGenerator, AsyncIterator, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ...contracts import Done, EngineEvent, EngineRequest, Error, Message, Start
from .responses import SSE_HEADERS, SSE_MEDIA_TYPE, ApiError, sources_json, sse
from .service import ChatService, SamplingBody, engine_params, new_nonce

WEB = Path(__file__).parent.parent / "web"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


# The engine request's `messages` is, here, the body's one `message` (plus the remembered turns).
FIELDS = {"messages": "message"}


class ChatBody(SamplingBody, Protocol):
    """What the routes read of a `ChatRequest` (`config.RequestModels`, a class built per settings)."""
    message: str
    conversation_id: str | None
    max_length: int | None
    stop: list[str] | None


def router(svc: ChatService) -> APIRouter:
    r = APIRouter()
    _page_routes(r)
    _chat_routes(r, svc)
    return r


def _page_routes(r: APIRouter) -> None:
    @r.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", headers=PAGE_HEADERS)

    @r.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = WEB / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path, headers=PAGE_HEADERS)


@dataclasses.dataclass(frozen=True)
class _Turn:
    """One user message of a conversation, and what the engine is asked for it."""
    cid: str
    message: str
    request: EngineRequest  # the conversation so far, then this message

    @classmethod
    def of(cls, svc: ChatService, body: ChatBody) -> "_Turn":
        asked: Message = {"role": "user", "content": body.message}
        svc.check_input([asked])
        cid = body.conversation_id or svc.conversations.new_id()
        messages = (*svc.conversations.history(cid), asked)
        return cls(cid, body.message, EngineRequest(messages, engine_params(body, body.max_length, body.stop)))

    def answered(self, svc: ChatService, done: Done, checkpoint: str, rid: str) -> dict:
        """Keep a complete answer in the conversation; the answer's JSON document."""
        if done.finish_reason in ("stop", "length"):  # not a filtered or cancelled one
            svc.conversations.add(self.cid, self.message, done.text)
        return {"reply": done.text, "checkpoint": checkpoint, "conversation_id": self.cid, "response_id": rid,
                "sources": sources_json(done.sources), "finish_reason": done.finish_reason, "usage": done.usage,
                "timings": {"ttft_ms": done.ttft_ms, "total_ms": done.total_ms}}


def _chat_routes(r: APIRouter, svc: ChatService) -> None:
    M = svc.models

    # `M.ChatRequest` is a class built per settings: FastAPI reads it, mypy cannot.
    @r.post("/chat")
    async def chat(body: M.ChatRequest, request: Request):  # type: ignore[name-defined]
        svc.admit(request)
        turn = _Turn.of(svc, body)
        done = await svc.collect(turn.request, FIELDS)
        rid = svc.remember(done, turn.request.messages, turn.cid)
        ckpt = done.checkpoint or ""
        return JSONResponse(turn.answered(svc, done, ckpt, rid),
                            headers={"X-Model-Checkpoint": ckpt, "X-Response-Id": rid})

    @r.post("/chat/stream")
    async def chat_stream(body: M.ChatRequest, request: Request):  # type: ignore[name-defined]
        svc.admit(request)
        turn = _Turn.of(svc, body)
        events = svc.events(turn.request)
        start = await svc.first(events, FIELDS)
        # Named before the answer exists (start event, header); the end gives the id that signs it.
        rid = new_nonce()
        return StreamingResponse(_chat_stream(svc, turn, events, start, rid), media_type=SSE_MEDIA_TYPE,
                                 headers={"X-Model-Checkpoint": start.checkpoint, "X-Response-Id": rid,
                                          "X-Conversation-Id": turn.cid, **SSE_HEADERS})


async def _chat_stream(svc: ChatService, turn: _Turn, events: AsyncGenerator[EngineEvent, None], start: Start,
                       rid: str) -> AsyncIterator[bytes]:
    """The SSE body: `start`, `token`s, then `done` (the answer's document) or `error`."""
    ckpt = start.checkpoint

    def on_end(ev: Done | Error) -> bytes:
        if isinstance(ev, Error):
            return sse({"status": ev.status, "message": ev.message}, "error")
        ev = dataclasses.replace(ev, checkpoint=ckpt)
        signed = svc.remember(ev, turn.request.messages, turn.cid, nonce=rid)
        return sse(turn.answered(svc, ev, ckpt, signed), "done")

    try:
        yield sse({"checkpoint": ckpt, "conversation_id": turn.cid, "response_id": rid,
                   "prompt_tokens": start.prompt_tokens, "sources": sources_json(start.sources)}, "start")
        async for chunk in svc.stream_text(events, lambda t: sse({"text": t}, "token"), on_end):
            yield chunk
    finally:
        await events.aclose()
