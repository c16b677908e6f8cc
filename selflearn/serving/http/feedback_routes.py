"""POST /feedback: a rating or a correction of an answer, stored for the next training round.

An answer is named by the `response_id` it came with; a replica that does not remember it checks
the prompt, reply and checkpoint the client sends back against the id's signature instead.

No `from __future__ import annotations` here: FastAPI must see the request classes built per
settings (`RequestModels`) as real objects, not strings.
"""

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...feedback import client_hash
from .responses import ApiError
from .service import ChatService


def router(svc: ChatService) -> APIRouter:
    r = APIRouter()
    M = svc.models

    @r.post("/feedback", status_code=201)
    async def feedback(body: M.FeedbackRequest, request: Request):
        wait = svc.limiter.take(svc.client(request))
        if wait > 0:
            raise ApiError(429, "rate limit exceeded", "rate_limit_error", code="rate_limited",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        answer = _answer(svc, body)
        if body.correction:
            verdict = svc.safety.check_input(body.correction)
            if not verdict.allowed:
                svc.metrics.rejected.labels("safety").inc()
                raise ApiError(400, f"correction blocked by the safety filter: {verdict.reason}", "content_filter",
                               param="correction", code="content_filter")
        given = {k: v for k, v in body.model_dump(exclude={"prompt", "reply", "checkpoint"}).items() if v is not None}
        doc = {"id": uuid.uuid4().hex[:16], "at": time.time(), "matched": answer is not None,
               "client": client_hash(svc.client(request)), **(answer or {}), **given}
        try:
            where = await asyncio.to_thread(svc.feedback.put, doc)
        except Exception as err:
            raise ApiError(503, f"the feedback store is unavailable: {type(err).__name__}", "server_error",
                           headers={"Retry-After": "5"}) from None
        if answer is None:
            learn = "kept as a note on the conversation; only feedback on an answer (a response_id) is learned"
        else:
            learn = "this will be learned in the next training round"
        return JSONResponse({"stored": True, "id": doc["id"], "matched": doc["matched"], "uri": where,
                             "learn": learn}, 201)

    return r


def _answer(svc: ChatService, body) -> dict | None:
    """The answer the feedback is about (None: a note on a conversation); 422/404 when it names none."""
    if not body.response_id and not body.conversation_id:
        raise ApiError(422, "feedback needs a response_id (or at least a conversation_id)",
                       param="response_id", code="invalid_value")
    if not body.response_id:
        return None
    answer = svc.answer_for(body.response_id, body.prompt, body.reply, body.checkpoint)
    if answer is None:
        raise ApiError(404, "unknown response_id: this server remembers its last 10,000 answers; for an "
                       "older one send back the prompt, reply and checkpoint it came with",
                       "invalid_request_error", param="response_id", code="unknown_response")
    return answer
