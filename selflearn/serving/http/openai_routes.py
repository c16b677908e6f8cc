"""The OpenAI-compatible API: GET /v1/models and POST /v1/chat/completions (JSON or SSE chunks).

The served checkpoint is the `model` and `system_fingerprint` of every answer; a request may
name the model as `selflearn`, the checkpoint id, the base model or `base:<base model>`.

No `from __future__ import annotations` here: FastAPI must see the request classes built per
settings (`RequestModels`) as real objects, not strings.
"""

import dataclasses
import time
import uuid
from typing import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...contracts import Done, EngineEvent, EngineRequest, EngineStatus, Error, base_id
from .responses import SSE_DONE, SSE_HEADERS, SSE_MEDIA_TYPE, ApiError, engine_error, sources_json, sse
from .service import ChatService, engine_params



def router(svc: ChatService) -> APIRouter:
    r = APIRouter()
    M = svc.models

    @r.get("/v1/models")
    async def models():
        weights = (await svc.status()).weights
        ckpt, created = weights.checkpoint, int(weights.loaded_at or time.time())
        data = [{"id": "selflearn", "object": "model", "created": created, "owned_by": "selflearn",
                 "checkpoint": ckpt}]
        if ckpt:
            data.append({"id": ckpt, "object": "model", "created": created, "owned_by": "selflearn",
                         "checkpoint": ckpt})
        return JSONResponse({"object": "list", "data": data}, headers={"X-Model-Checkpoint": ckpt or ""})

    # `M.ChatCompletionRequest` is a class built per settings: FastAPI reads it, mypy cannot.
    @r.post("/v1/chat/completions")
    async def completions(body: M.ChatCompletionRequest, request: Request):  # type: ignore[name-defined]
        svc.admit(request)
        await _check_model(svc, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        svc.check_input(messages)
        params = engine_params(body, body.max_completion_tokens or body.max_tokens, body.stops())
        req = EngineRequest(tuple(messages), params)
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if not body.stream:
            return await _completion(svc, req, cid, created)
        events = svc.events(req)
        start = await svc.first(events)
        chunks = _Chunks(cid, created, start.checkpoint)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_completion_stream(svc, events, chunks, include_usage),
                                 media_type=SSE_MEDIA_TYPE,
                                 headers={"X-Model-Checkpoint": start.checkpoint, **SSE_HEADERS})

    return r


async def _check_model(svc: ChatService, name: str) -> EngineStatus:
    """The model's status if `name` is one of the served model's names, else 404. A name the
    cached status does not know is checked again on a fresh one (the model may just have swapped)."""
    for max_age in (5.0, 0.0):
        st = await svc.status(max_age=max_age)
        weights = st.weights
        names = {"selflearn", weights.checkpoint, weights.base_model,
                 base_id(weights.base_model) if weights.base_model else None}
        if name in names:
            return st
    raise ApiError(404, f"the model {name!r} does not exist; GET /v1/models lists what is served",
                   param="model", code="model_not_found")


async def _completion(svc: ChatService, req: EngineRequest, cid: str, created: int) -> JSONResponse:
    done = await svc.collect(req)
    ckpt = done.checkpoint or ""
    rid = svc.remember(done, req.messages, None)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": ckpt,
        "system_fingerprint": ckpt, "checkpoint": ckpt, "response_id": rid, "sources": sources_json(done.sources),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                     "finish_reason": done.finish_reason, "logprobs": None}],
        "usage": done.usage}, headers={"X-Model-Checkpoint": ckpt, "X-Response-Id": rid})


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """The `chat.completion.chunk` events of one streamed completion."""
    id: str
    created: int
    model: str  # the checkpoint

    def _head(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": self.model}

    def delta(self, delta: dict, finish: str | None = None) -> bytes:
        return sse({**self._head(), "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                 "logprobs": None}]})

    def end(self, ev: Done | Error, include_usage: bool) -> bytes:
        """The last chunk: the finish reason (and the usage when asked for), or the error (the
        shape of every error body: type, param and code as a JSON answer would have them)."""
        if isinstance(ev, Error):
            return sse(engine_error(ev).body())
        out = sse({**self._head(), "choices": [{"index": 0, "delta": {}, "finish_reason": ev.finish_reason,
                                                "logprobs": None}], "sources": sources_json(ev.sources)})
        if include_usage and ev.usage:
            out += sse({**self._head(), "choices": [], "usage": ev.usage})
        return out


async def _completion_stream(svc: ChatService, events: AsyncGenerator[EngineEvent, None], chunks: _Chunks,
                             include_usage: bool) -> AsyncIterator[bytes]:
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
        async for piece in svc.stream_text(events, lambda t: chunks.delta({"content": t}),
                                           lambda ev: chunks.end(ev, include_usage)):
            yield piece
        yield SSE_DONE
    finally:
        await events.aclose()
