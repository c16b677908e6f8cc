"""POST /feedback: a rating or a correction of an answer, stored for the next training round.

An answer is named by the `response_id` it came with; a replica that does not remember it checks
the prompt, reply and checkpoint the client sends back against the id's signature instead. In
front of the store: rate limits per client and per API key, the safety filter on every free-text
field, one copy of feedback sent again, and a daily quota per client and for the whole store.

No `from __future__ import annotations` here: FastAPI must see the request classes built per
settings (`RequestModels`) as real objects, not strings.
"""

import asyncio
import hashlib
import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...feedback import client_hash, normalize
from .responses import ApiError
from .service import ChatService

log = logging.getLogger(__name__)
LEARN = "this will be learned in the next training round"
NOTE = "kept as a note on the conversation; only feedback on an answer (a response_id) is learned"


def router(svc: ChatService) -> APIRouter:
    r = APIRouter()
    M = svc.models

    # `M.FeedbackRequest` is a class built per settings: FastAPI reads it, mypy cannot.
    @r.post("/feedback", status_code=201)
    async def feedback(body: M.FeedbackRequest, request: Request):  # type: ignore[name-defined]
        svc.admit_feedback(request)
        answer = await _answer(svc, body)
        _check_text(svc, body)
        client = client_hash(svc.client(request))
        same = _sameness(body)
        if (first := svc.feedback_quota.seen.get(same)) is not None:
            return JSONResponse({**first, "stored": False, "duplicate": True}, 200)
        given = {k: v for k, v in body.model_dump(exclude={"prompt", "reply", "checkpoint"}).items() if v is not None}
        doc = {"id": uuid.uuid4().hex[:16], "at": time.time(), "matched": answer is not None, "client": client,
               **(answer or {}), **given}
        reply = {"stored": True, "id": doc["id"], "matched": doc["matched"], "uri": None,
                 "learn": NOTE if answer is None else LEARN}
        svc.feedback_quota.seen.put(same, reply)  # before the write: a repeat sent meanwhile is one too
        try:
            reply["uri"] = await _store(svc, doc, client)
        except BaseException:
            svc.feedback_quota.seen.pop(same, None)
            raise
        return JSONResponse(reply, 201)

    return r


async def _answer(svc: ChatService, body) -> dict | None:
    """The answer the feedback is about (None: a note on a conversation); 422/404 when it names none."""
    if not body.response_id and not body.conversation_id:
        raise ApiError(422, "feedback needs a response_id (or at least a conversation_id)",
                       param="response_id", code="invalid_value")
    if not body.response_id:
        return None
    answer = await svc.verified_answer(body.response_id, body.prompt, body.reply, body.checkpoint)
    if answer is None:
        raise ApiError(404, "unknown response_id: this server remembers its last 10,000 answers; for an "
                       "older one send back the prompt, reply and checkpoint it came with",
                       "invalid_request_error", param="response_id", code="unknown_response")
    return answer


def _check_text(svc: ChatService, body) -> None:
    """400 when the safety filter refuses any free text of the body (what the trainer would read)."""
    for name in ("correction", "comment"):
        text = getattr(body, name)
        if text and not (verdict := svc.safety.check_input(text)).allowed:
            svc.metrics.rejected.labels("safety").inc()
            raise ApiError(400, f"{name} blocked by the safety filter: {verdict.reason}", "content_filter",
                           param=name, code="content_filter")


def _sameness(body) -> str:
    """What makes a post a repeat: the same answer (a stream's start id and its signed id share
    their first 16 characters) or conversation, rating, correction and comment."""
    about = body.response_id[:16] if body.response_id else f"conversation:{body.conversation_id}"
    what = [about, body.rating, normalize(body.correction or ""), normalize(body.comment or "")]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()


async def _store(svc: ChatService, doc: dict, client: str) -> str:
    """Write `doc` within the day's quota (429/503 over it, counted); rotate old days on a new one."""
    now, size = doc["at"], len(svc.feedback.encode(doc))
    rotate = svc.feedback_quota.new_day(now)
    if refusal := svc.feedback_quota.take(client, size, now):
        svc.metrics.rejected.labels("feedback_quota").inc()
        raise ApiError(refusal.status, refusal.message, "rate_limit_error" if refusal.status == 429 else "server_busy",
                       code=refusal.code, headers={"Retry-After": str(refusal.retry_after)})
    try:
        where = await asyncio.to_thread(svc.feedback.put, doc)
    except Exception as err:
        svc.feedback_quota.give_back(client, size)
        raise ApiError(503, f"the feedback store is unavailable: {type(err).__name__}", "server_error",
                       headers={"Retry-After": "5"}) from None
    if rotate:
        asyncio.get_running_loop().run_in_executor(None, _rotate, svc, now)
    return where


def _rotate(svc: ChatService, now: float) -> None:
    try:
        if gone := svc.feedback.rotate(now, svc.settings.feedback_retention_days):
            log.info("feedback: deleted %d days older than %d days: %s", len(gone),
                     svc.settings.feedback_retention_days, ", ".join(gone))
    except Exception as err:  # the next new day tries again
        log.warning("feedback: rotating old days failed: %s: %s", type(err).__name__, err)
