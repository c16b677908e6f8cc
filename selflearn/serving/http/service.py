"""The chat service: what every route shares, independent of any one route's wire format.

It holds one ingress replica's state (rate limits, conversations, answers awaiting feedback,
metrics, the safety filter) and talks to the model through a `Backend`: admission, engine events
under the request timeout, whole answers, the output filter on a stream, and the response ids
that let feedback name an answer later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import time
import uuid
from typing import AsyncIterator, Callable, Iterator, Protocol, TypedDict, TypeVar

from fastapi import Request

from ...basemodel import cache_root
from ...contracts import END_EVENTS, Done, EngineEvent, Error, Start, Token
from ...feedback import answer_mac
from ..config import RequestModels, ServeSettings
from ..safety import load_filter
from ..state import LRU, Conversations, FeedbackStore, Metrics, RateLimiter
from .responses import ApiError, engine_error

log = logging.getLogger(__name__)
T = TypeVar("T")


class Completion(TypedDict):
    """A whole answer: the Start event (None if the request never got a slot) and how it ended."""
    start: Start | None
    end: Done | Error


class Backend(Protocol):
    """The model, as the HTTP API sees it (in Ray Serve, the ChatModel handle: see app.py)."""
    def stream(self, request: dict) -> AsyncIterator[EngineEvent]: ...
    async def complete(self, request: dict) -> Completion: ...
    async def status(self) -> dict: ...


def new_nonce() -> str:
    """The first part of a response id."""
    return uuid.uuid4().hex[:16]


def engine_params(body, max_new_tokens: int | None, stop: list[str] | None) -> dict:
    """A request body's sampling fields as the engine request's `params`."""
    return {"max_new_tokens": max_new_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "repetition_penalty": body.repetition_penalty, "seed": body.seed, "stop": stop}


class ChatService:
    def __init__(self, backend: Backend | None, settings: ServeSettings):
        self.backend, self.settings = backend, settings
        self.models = RequestModels(settings.max_message_chars, settings.engine.max_new_tokens_cap)
        self.metrics = Metrics()
        self.limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        self.conversations = Conversations(settings.history_turns, settings.max_conversations)
        self.answers = LRU(10_000)  # response_id -> what feedback refers to
        self.safety = load_filter(settings.safety_filter, settings.blocklist)
        self.inflight = 0
        self._status: tuple[float, dict] = (0.0, {})
        feedback_uri = settings.feedback_uri or f"file://{cache_root() / 'feedback'}"
        self.feedback = FeedbackStore(feedback_uri, endpoint=settings.storage_endpoint, region=settings.storage_region)
        self.api_key = settings.api_key or os.environ.get(settings.api_key_env) or None
        # Every ingress replica derives the same secret from the same settings.
        secret = os.environ.get(settings.feedback_secret_env) or f"{self.api_key or ''}\0{feedback_uri}"
        self.answer_secret = hashlib.sha256(b"selflearn-answers\0" + secret.encode()).digest()

    # -- admission -------------------------------------------------------------------------------
    def client(self, request: Request) -> str:
        """Who is asking, for rate limits and the feedback record (behind a proxy: X-Forwarded-For)."""
        if self.settings.trust_forwarded_for and (fwd := request.headers.get("x-forwarded-for")):
            return fwd.split(",")[0].strip()
        return request.client.host if request.client else "unknown"

    def admit(self, request: Request) -> None:
        """Raise 429 over the client's rate limit, 503 when this replica has its fill of requests."""
        wait = self.limiter.take(self.client(request))
        if wait > 0:
            self.metrics.rejected.labels("rate_limit").inc()
            raise ApiError(429, f"rate limit of {self.settings.rate_limit_per_minute:g} requests per minute "
                           f"exceeded; retry in {wait:.1f}s", "rate_limit_error", code="rate_limited",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        if self.inflight >= self.settings.max_inflight:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, f"server busy: {self.inflight} requests in flight", "server_busy",
                           code="queue_full", headers={"Retry-After": "1"})

    def check_input(self, messages: list[dict]) -> None:
        """Raise 400 if the safety filter refuses a message (the assistant's own turns are not checked)."""
        for m in messages:
            if m["role"] == "assistant":
                continue
            verdict = self.safety.check_input(m["content"])
            if not verdict.allowed:
                self.metrics.rejected.labels("safety").inc()
                raise ApiError(400, f"blocked by the safety filter: {verdict.reason}", "content_filter",
                               code="content_filter")

    async def status(self, max_age: float = 1.0) -> dict:
        """The model's status, at most `max_age` seconds old (probes and scrapes come often)."""
        at, cached = self._status
        if time.monotonic() - at > max_age or not cached:
            cached = await asyncio.wait_for(self.backend.status(), 10)
            self._status = (time.monotonic(), cached)
            self.metrics.engine.status = cached
        return cached

    # -- generation ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)

    def _timed_out(self) -> str:
        return f"the request timed out after {self.settings.request_timeout_s:g}s"

    @staticmethod
    def _unavailable(err: Exception) -> str:
        log.warning("model call failed: %s", err)
        return f"the model is unavailable ({type(err).__name__}); retry shortly"

    async def events(self, req: dict) -> AsyncIterator[EngineEvent]:
        """Engine events under the request timeout, ending with `Done` or `Error` (timeout: 504,
        model unreachable: 503). Counts in flight."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        agen = self.backend.stream(req).__aiter__()
        try:
            with self._in_flight():
                while True:
                    left = deadline - time.monotonic()
                    try:
                        ev = await asyncio.wait_for(agen.__anext__(), max(left, 0.001))
                    except StopAsyncIteration:
                        return
                    except asyncio.TimeoutError:
                        yield Error(504, self._timed_out())
                        return
                    except Exception as err:  # replica gone, back-pressure, transport errors
                        yield Error(503, self._unavailable(err))
                        return
                    yield ev
                    if isinstance(ev, END_EVENTS):
                        if isinstance(ev, Done):
                            self.metrics.observe_done(ev)
                        return
        finally:
            await agen.aclose()

    @staticmethod
    async def first(events: AsyncIterator[EngineEvent]) -> Start:
        """The stream's `Start` event, before any response is sent: an `Error` is raised instead."""
        ev = await events.__anext__()
        if isinstance(ev, Error):
            await events.aclose()
            raise engine_error(ev)
        return ev

    async def collect(self, req: dict) -> tuple[Start | None, Done]:
        """Run a request to the end without streaming: its Start and Done events, output filtered.
        Raises ApiError for an Error event, a timeout (504) or an unreachable model (503)."""
        with self._in_flight():
            try:
                res = await asyncio.wait_for(self.backend.complete(req), self.settings.request_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, self._timed_out(), "timeout", code="timeout") from None
            except Exception as err:  # replica gone, back-pressure, transport errors
                raise ApiError(503, self._unavailable(err), "server_busy", headers={"Retry-After": "1"}) from None
        done = res["end"]
        if isinstance(done, Error):
            raise engine_error(done)
        self.metrics.observe_done(done)
        if not self.safety.check_output(done.text).allowed:
            done = dataclasses.replace(done, text="", finish_reason="content_filter")
        return res["start"], done

    async def stream_text(self, events: AsyncIterator[EngineEvent], on_token: Callable[[str], T],
                          on_end: Callable[[Done | Error], T]) -> AsyncIterator[T]:
        """Relay `Token`s through the output filter as `on_token(text)` and the end as `on_end(event)`;
        stops the generation if the filter trips (then the end is a `content_filter` Done)."""
        text = ""
        async for ev in events:
            match ev:
                case Token():
                    text += ev.text
                    if not self.safety.check_output(text).allowed:
                        await events.aclose()
                        yield on_end(Done("content_filter", text))
                        return
                    yield on_token(ev.text)
                case Done() | Error():
                    yield on_end(ev)

    # -- answers, for feedback -------------------------------------------------------------------
    def remember(self, done: Done, messages: list[dict], cid: str | None, nonce: str | None = None) -> str:
        """A response id that signs the answer: feedback can name it to any replica, later. A
        stream names its answer before it exists: by `nonce` alone, which this replica also
        remembers, until its end gives the signed id."""
        nonce = nonce or new_nonce()
        prompt, reply = messages[-1]["content"], done.text
        rid = nonce + answer_mac(self.answer_secret, nonce, done.checkpoint, prompt, reply)
        answer = {"checkpoint": done.checkpoint, "conversation_id": cid, "prompt": prompt, "reply": reply,
                  "finish_reason": done.finish_reason}
        self.answers.put(rid, answer)
        self.answers.put(nonce, answer)
        return rid

    def answer_for(self, response_id: str, prompt: str | None, reply: str | None,
                   checkpoint: str | None) -> dict | None:
        """What a response id refers to: this replica's memory, else the answer the client sent
        back if the id signs it; None when neither."""
        if (known := self.answers.get(response_id)) is not None:
            return known
        if prompt is None or reply is None or len(response_id) != 36:
            return None
        nonce, mac = response_id[:16], response_id[16:]
        if not hmac.compare_digest(mac, answer_mac(self.answer_secret, nonce, checkpoint, prompt, reply)):
            return None
        return {"checkpoint": checkpoint, "prompt": prompt, "reply": reply}
