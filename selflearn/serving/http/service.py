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
import secrets
import time
import uuid
from typing import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Protocol, TypeVar

from fastapi import Request

from ...basemodel import cache_root
from ...contracts import (END_EVENTS, Completion, Done, EngineEvent, EngineRequest, EngineStatus, Error, Message,
                          RequestParams, Start, Token)
from ...feedback import answer_mac, client_hash
from ..config import RequestModels, ServeSettings, api_key_of
from ..safety import load_filter
from ..state import LRU, Conversations, FeedbackQuota, FeedbackStore, Metrics, RateLimiter
from .guard import proxy_trust
from .responses import ApiError, engine_error

log = logging.getLogger(__name__)
T = TypeVar("T")


class Backend(Protocol):
    """The model, as the HTTP API sees it (in Ray Serve, the ChatModel handle: see app.py)."""
    def stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]: ...
    async def complete(self, request: EngineRequest) -> Completion: ...
    async def status(self) -> EngineStatus: ...


class SamplingBody(Protocol):
    """The sampling fields every chat body has (`config.RequestModels`)."""
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    seed: int | None
    memory: bool | None


def new_nonce() -> str:
    """The first part of a response id."""
    return uuid.uuid4().hex[:16]


def engine_params(body: SamplingBody, max_new_tokens: int | None, stop: list[str] | None) -> RequestParams:
    """A request body's sampling fields as the engine request's parameters."""
    return RequestParams(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                         top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed,
                         stop=None if stop is None else tuple(stop), memory=body.memory)


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
        self._status: tuple[float, EngineStatus | None] = (0.0, None)
        feedback_uri = settings.feedback_uri or f"file://{cache_root() / 'feedback'}"
        self.feedback = FeedbackStore(feedback_uri, endpoint=settings.storage_endpoint, region=settings.storage_region)
        # A named variable without a key refuses to start (ValueError) rather than run open.
        self.api_key = api_key_of(settings, os.environ)
        if self.api_key is None:
            log.warning("auth off: no API key configured (api_key, api_key_env or SELFLEARN_API_KEY); "
                        "every route is open to whoever reaches this server")
        self.feedback_limiter = RateLimiter(settings.feedback_rate_limit_per_minute, settings.feedback_rate_limit_burst)
        self.feedback_key_limiter = RateLimiter(settings.feedback_key_rate_limit_per_minute)
        self.feedback_quota = FeedbackQuota(settings.feedback_max_items_per_client_per_day,
                                            settings.feedback_max_bytes_per_day)
        self._secret_read_at = 0.0
        self.answer_secret = self._answer_secret()

    @property
    def model(self) -> Backend:
        if self.backend is None:  # built without a model: only admission and feedback work
            raise RuntimeError("this chat service has no model backend")
        return self.backend

    # -- admission -------------------------------------------------------------------------------
    def client(self, request: Request) -> str:
        """Who is asking, for rate limits and the feedback record: the connection's peer, or the client
        a trusted proxy names in X-Forwarded-For (`guard.ProxyTrust`)."""
        peer = request.client.host if request.client else None
        return proxy_trust(self.settings).client(peer, ",".join(request.headers.getlist("x-forwarded-for")))

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

    def check_input(self, messages: list[Message]) -> None:
        """Raise 400 if the safety filter refuses a message (the assistant's own turns are not checked)."""
        for m in messages:
            if m["role"] == "assistant":
                continue
            verdict = self.safety.check_input(m["content"])
            if not verdict.allowed:
                self.metrics.rejected.labels("safety").inc()
                raise ApiError(400, f"blocked by the safety filter: {verdict.reason}", "content_filter",
                               code="content_filter")

    async def status(self, max_age: float = 1.0) -> EngineStatus:
        """The model's status, at most `max_age` seconds old (probes and scrapes come often)."""
        at, cached = self._status
        if cached is None or time.monotonic() - at > max_age:
            cached = await asyncio.wait_for(self.model.status(), 10)
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

    async def events(self, req: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        """Engine events under the request timeout, ending with `Done` or `Error` (timeout: 504,
        model unreachable: 503). Counts in flight."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        agen = self.model.stream(req)
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
    async def first(events: AsyncGenerator[EngineEvent, None], fields: Mapping[str, str] | None = None) -> Start:
        """The stream's `Start` event, before any response is sent: an `Error` is raised instead
        (`fields`: the route's names for the engine request's fields, see `engine_error`)."""
        ev = await events.__anext__()
        if isinstance(ev, Start):
            return ev
        await events.aclose()
        raise engine_error(ev if isinstance(ev, Error) else Error(500, "the generation did not start"), fields)

    async def collect(self, req: EngineRequest, fields: Mapping[str, str] | None = None) -> Done:
        """Run a request to the end without streaming: its Done event, output filtered, naming the
        checkpoint that wrote it. Raises ApiError for an Error event, a timeout (504) or an
        unreachable model (503)."""
        with self._in_flight():
            try:
                res = await asyncio.wait_for(self.model.complete(req), self.settings.request_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, self._timed_out(), "timeout", code="timeout") from None
            except Exception as err:  # replica gone, back-pressure, transport errors
                raise ApiError(503, self._unavailable(err), "server_busy", headers={"Retry-After": "1"}) from None
        done = res.end
        if isinstance(done, Error):
            raise engine_error(done, fields)
        if done.checkpoint is None and res.start is not None:
            done = dataclasses.replace(done, checkpoint=res.start.checkpoint)
        self.metrics.observe_done(done)
        if not self.safety.check_output(done.text).allowed:
            done = dataclasses.replace(done, text="", finish_reason="content_filter")
        return done

    async def stream_text(self, events: AsyncGenerator[EngineEvent, None], on_token: Callable[[str], T],
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
    def _answer_secret(self) -> bytes:
        """The key response ids are signed with, never derived from anything a client can see: the
        one `feedback_secret_env` names (a Kubernetes Secret), else the feedback store's own (random,
        made once per store, shared by every replica and restart). A store this replica cannot read
        leaves it a key of its own (its answers take feedback here only) until `verified_answer`
        reads the store's."""
        if given := os.environ.get(self.settings.feedback_secret_env):
            return hashlib.sha256(b"selflearn-answers\0" + given.encode()).digest()
        self._secret_read_at = time.monotonic()
        try:
            return self.feedback.answer_secret()
        except Exception as err:  # unreachable, denied, a bad object: chat goes on, feedback stays local
            log.warning("cannot read the feedback secret from %s (%s: %s); answers from this replica take "
                        "feedback here only until it can", self.feedback.uri, type(err).__name__, err)
            return secrets.token_bytes(32)

    def admit_feedback(self, request: Request) -> None:
        """Raise 429 over /feedback's rate limits, kept apart from chat's: per client address, and
        per API key when one is required (a key shared by many clients still has a ceiling)."""
        buckets = [(self.feedback_limiter, self.client(request), "this client")]
        if self.api_key:  # the guard let the request in: it carries this key
            buckets.append((self.feedback_key_limiter, "key:" + client_hash(self.api_key), "this API key"))
        for limiter, who, name in buckets:
            wait = limiter.take(who)
            if wait > 0:
                self.metrics.rejected.labels("feedback_rate_limit").inc()
                raise ApiError(429, f"feedback rate limit of {limiter.rate * 60:g} a minute for {name} exceeded; "
                               f"retry in {wait:.1f}s", "rate_limit_error", code="rate_limited",
                               headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    def remember(self, done: Done, messages: list[Message] | tuple[Message, ...], cid: str | None,
                 nonce: str | None = None) -> str:
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

    async def verified_answer(self, response_id: str, prompt: str | None, reply: str | None,
                              checkpoint: str | None) -> dict | None:
        """`answer_for`, tried once more with the store's secret read again (at most once a minute)
        when the id does not verify: a replica that started while the store was unreachable, or
        lost the race to create the secret on a store without conditional writes, catches up."""
        if (answer := self.answer_for(response_id, prompt, reply, checkpoint)) is not None:
            return answer
        if (prompt is None or reply is None or os.environ.get(self.settings.feedback_secret_env)
                or time.monotonic() - self._secret_read_at < 60):
            return None
        self._secret_read_at = time.monotonic()
        try:
            secret = await asyncio.to_thread(self.feedback.answer_secret)
        except Exception:
            return None
        if secret == self.answer_secret:
            return None
        log.warning("the feedback store's secret differs from the one this replica signed with: using the store's")
        self.answer_secret = secret
        return self.answer_for(response_id, prompt, reply, checkpoint)
