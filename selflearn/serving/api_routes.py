"""Route handlers of `Api` (kept apart so each file stays readable).

No `from __future__ import annotations` here: FastAPI must see the request classes built per
settings (`RequestModels`) as real objects, not strings.
"""

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..feedback import client_hash
from .api import PAGE_HEADERS, WEB, Api, ApiError, _sse, new_nonce


def _params(body, max_new) -> dict:
    return {"max_new_tokens": max_new, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
            "repetition_penalty": body.repetition_penalty, "seed": body.seed}


def register(api: Api, app: FastAPI, M) -> None:  # noqa: C901 - one small handler per route
    # -- page, health, status, metrics -----------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = WEB / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path, headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/readyz")
    async def readyz():
        try:
            st = await api.status(max_age=0.5)
        except Exception as err:  # the model deployment is down or not reachable
            return JSONResponse({"ready": False, "reason": f"model unavailable: {type(err).__name__}"}, 503)
        body = {"ready": bool(st.get("ready")), "checkpoint": st.get("checkpoint"),
                "degraded": bool(st.get("degraded")), "loading": st.get("loading")}
        headers = {"X-Model-Checkpoint": st["checkpoint"]} if st.get("checkpoint") else None
        return JSONResponse(body, 200 if body["ready"] else 503, headers=headers)

    @app.get("/status")
    async def status():
        st = await api.status(max_age=0)
        return JSONResponse({"model": st, "ingress": {"inflight": api.inflight,
                                                      "feedback_uri": api.feedback.uri}},
                            headers={"X-Model-Checkpoint": st.get("checkpoint") or ""})

    @app.get("/metrics")
    async def metrics():
        try:
            await api.status(max_age=0)
        except Exception:
            api.metrics.engine.status = {}
        return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if api.settings.state_file:
        @app.get("/api/rounds")
        async def rounds():
            try:
                doc = await asyncio.to_thread(lambda: json.loads(open(api.settings.state_file).read()))
            except FileNotFoundError:
                raise ApiError(404, "no run state yet", code="not_found") from None
            except (OSError, json.JSONDecodeError) as err:
                raise ApiError(503, f"run state unreadable: {err}", "server_error") from None
            return JSONResponse(doc)

    # -- the seed's chat API ---------------------------------------------------------------------
    def chat_request(body):
        api._check_input([{"role": "user", "content": body.message}])
        cid = body.conversation_id or api.conversations.new_id()
        messages = api.conversations.history(cid) + [{"role": "user", "content": body.message}]
        params = _params(body, body.max_length)
        params["stop"] = body.stop
        return cid, messages, {"messages": messages, "params": params}

    @app.post("/chat")
    async def chat(body: M.ChatRequest, request: Request):
        api._admit(request)
        cid, messages, req = chat_request(body)
        start, done = await api._collect(req)
        if done["finish_reason"] in ("stop", "length"):
            api.conversations.add(cid, body.message, done["text"])
        rid = api._remember(done, messages, cid)
        ckpt = done.get("checkpoint") or start["checkpoint"]
        return JSONResponse({"reply": done["text"], "checkpoint": ckpt, "conversation_id": cid, "response_id": rid,
                             "finish_reason": done["finish_reason"], "usage": done["usage"],
                             "timings": {"ttft_ms": done.get("ttft_ms"), "total_ms": done.get("total_ms")}},
                            headers={"X-Model-Checkpoint": ckpt, "X-Response-Id": rid})

    @app.post("/chat/stream")
    async def chat_stream(body: M.ChatRequest, request: Request):
        api._admit(request)
        cid, messages, req = chat_request(body)
        events = api._events(req)
        start = await api._first(events)
        # Named before the answer exists (start event, header); the done event gives the id
        # that signs it.
        ckpt, rid = start["checkpoint"], new_nonce()

        def on_done(ev):
            if ev["type"] == "error":
                return _sse({"status": ev.get("status", 500), "message": ev.get("message")}, "error")
            if ev["finish_reason"] in ("stop", "length"):
                api.conversations.add(cid, body.message, ev["text"])
            signed = api._remember({**ev, "checkpoint": ckpt}, messages, cid, nonce=rid)
            return _sse({"reply": ev["text"], "checkpoint": ckpt, "conversation_id": cid, "response_id": signed,
                         "finish_reason": ev["finish_reason"], "usage": ev.get("usage"),
                         "timings": {"ttft_ms": ev.get("ttft_ms"), "total_ms": ev.get("total_ms")}}, "done")

        async def body_iter():
            try:
                yield _sse({"checkpoint": ckpt, "conversation_id": cid, "response_id": rid,
                            "prompt_tokens": start.get("prompt_tokens")}, "start")
                async for chunk in api._stream_text(events, lambda t: _sse({"text": t}, "token"), on_done):
                    yield chunk
            finally:
                await events.aclose()

        return StreamingResponse(body_iter(), media_type="text/event-stream",
                                 headers={"X-Model-Checkpoint": ckpt, "X-Response-Id": rid,
                                          "X-Conversation-Id": cid, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # -- OpenAI-compatible -----------------------------------------------------------------------
    async def check_model(name: str) -> dict:
        for max_age in (5.0, 0.0):
            st = await api.status(max_age=max_age)
            names = {"selflearn", st.get("checkpoint"), st.get("base_model"), f"base:{st.get('base_model')}"}
            if name in names:
                return st
        raise ApiError(404, f"the model {name!r} does not exist; GET /v1/models lists what is served",
                       param="model", code="model_not_found")

    @app.get("/v1/models")
    async def models():
        st = await api.status()
        ckpt, created = st.get("checkpoint"), int(st.get("loaded_at") or time.time())
        data = [{"id": "selflearn", "object": "model", "created": created, "owned_by": "selflearn",
                 "checkpoint": ckpt}]
        if ckpt:
            data.append({"id": ckpt, "object": "model", "created": created, "owned_by": "selflearn",
                         "checkpoint": ckpt})
        return JSONResponse({"object": "list", "data": data}, headers={"X-Model-Checkpoint": ckpt or ""})

    @app.post("/v1/chat/completions")
    async def completions(body: M.ChatCompletionRequest, request: Request):
        api._admit(request)
        await check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        api._check_input(messages)
        params = _params(body, body.max_completion_tokens or body.max_tokens)
        params["stop"] = body.stops()
        req = {"messages": messages, "params": params}
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if not body.stream:
            start, done = await api._collect(req)
            ckpt = done.get("checkpoint") or start["checkpoint"]
            rid = api._remember(done, messages, None)
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": ckpt,
                "system_fingerprint": ckpt, "checkpoint": ckpt, "response_id": rid,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]},
                             "finish_reason": done["finish_reason"], "logprobs": None}],
                "usage": done["usage"]}, headers={"X-Model-Checkpoint": ckpt, "X-Response-Id": rid})

        events = api._events(req)
        start = await api._first(events)
        ckpt = start["checkpoint"]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish=None) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": ckpt,
                         "system_fingerprint": ckpt, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish, "logprobs": None}]})

        def on_done(ev) -> bytes:
            if ev["type"] == "error":
                return _sse({"error": {"message": ev.get("message"), "type": "server_error",
                                       "code": str(ev.get("status", 500))}})
            out = chunk({}, ev["finish_reason"])
            if include_usage and ev.get("usage"):
                out += _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": ckpt,
                             "system_fingerprint": ckpt, "choices": [], "usage": ev["usage"]})
            return out

        async def body_iter():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in api._stream_text(events, lambda t: chunk({"content": t}), on_done):
                    yield piece
                yield b"data: [DONE]\n\n"
            finally:
                await events.aclose()

        return StreamingResponse(body_iter(), media_type="text/event-stream",
                                 headers={"X-Model-Checkpoint": ckpt, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # -- feedback --------------------------------------------------------------------------------
    @app.post("/feedback", status_code=201)
    async def feedback(body: M.FeedbackRequest, request: Request):
        wait = api.limiter.take(api._client(request))
        if wait > 0:
            raise ApiError(429, "rate limit exceeded", "rate_limit_error", code="rate_limited",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        if not body.response_id and not body.conversation_id:
            raise ApiError(422, "feedback needs a response_id (or at least a conversation_id)",
                           param="response_id", code="invalid_value")
        answer = None
        if body.response_id:
            answer = api.answer_for(body.response_id, body.prompt, body.reply, body.checkpoint)
            if answer is None:
                raise ApiError(404, "unknown response_id: this server remembers its last 10,000 answers; for an "
                               "older one send back the prompt, reply and checkpoint it came with",
                               "invalid_request_error", param="response_id", code="unknown_response")
        if body.correction:
            verdict = api.safety.check_input(body.correction)
            if not verdict.allowed:
                api.metrics.rejected.labels("safety").inc()
                raise ApiError(400, f"correction blocked by the safety filter: {verdict.reason}", "content_filter",
                               param="correction", code="content_filter")
        given = {k: v for k, v in body.model_dump(exclude={"prompt", "reply", "checkpoint"}).items() if v is not None}
        doc = {"id": uuid.uuid4().hex[:16], "at": time.time(), "matched": answer is not None,
               "client": client_hash(api._client(request)), **(answer or {}), **given}
        try:
            where = await asyncio.to_thread(api.feedback.put, doc)
        except Exception as err:
            raise ApiError(503, f"the feedback store is unavailable: {type(err).__name__}", "server_error",
                           headers={"Retry-After": "5"}) from None
        if answer is None:
            learn = "kept as a note on the conversation; only feedback on an answer (a response_id) is learned"
        else:
            learn = "this will be learned in the next training round"
        return JSONResponse({"stored": True, "id": doc["id"], "matched": doc["matched"], "uri": where,
                             "learn": learn}, 201)
