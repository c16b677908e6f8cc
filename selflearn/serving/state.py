"""Ingress-side state: rate limiting, conversation memory, answers awaiting feedback, the feedback
store and its daily quota, and Prometheus metrics. All of it lives in one ingress replica's event
loop (no locks needed); with several ingress replicas, memory and limits are per replica (route
sticky or keep it at one). The feedback store's secret is the exception: the store holds it, so
every replica shares it.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..contracts import Done, EngineStatus


class RateLimiter:
    """Token bucket per client: `rate` requests per minute, bursts of up to `burst`."""

    def __init__(self, per_minute: float, burst: int | None = None, max_clients: int = 100_000):
        self.rate = per_minute / 60.0
        self.burst = float(burst or max(1, math.ceil(per_minute)))
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, client: str, now: float | None = None) -> float:
        """0 if allowed (a token is spent), else the seconds until the next token."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class Conversations:
    """Bounded history per conversation_id: the last `turns` exchanges (user + assistant)."""

    def __init__(self, turns: int, capacity: int):
        self.turns = turns
        self._lru = LRU(capacity)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:16]

    def history(self, cid: str) -> list[dict[str, str]]:
        return list(self._lru.get(cid, []))

    def add(self, cid: str, user: str, assistant: str) -> None:
        if self.turns == 0:
            return
        msgs = self.history(cid) + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        self._lru.put(cid, msgs[-2 * self.turns:])


class FeedbackStore:
    """One JSON object per piece of feedback under a file:// or s3:// prefix (write-then-rename),
    and beside them the secret that signs response ids (`answer_secret`)."""

    SECRET_KEY = "answer-secret"  # not a record key: readers skip it, rotation never deletes it

    def __init__(self, uri: str, endpoint: str | None = None, region: str | None = None):
        from ..checkpoints import CheckpointStore

        self.uri = uri.rstrip("/")
        self.store = CheckpointStore.from_uri(self.uri, endpoint=endpoint, region=region)

    @staticmethod
    def encode(doc: dict) -> bytes:
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    def put(self, doc: dict) -> str:
        from ..feedback import record_key

        key = record_key(doc["at"], doc["id"])
        self.store.backend.put_bytes(key, self.encode(doc))
        return f"{self.uri}/{key}"

    def answer_secret(self) -> bytes:
        """32 random bytes, created by the first ingress replica that asks and kept in the store, so
        every replica and every restart signs with the same key and no client can derive it. Two
        replicas creating it at once: the first write wins (create-if-absent: a hard link on a
        file system, `If-None-Match: *` on S3) and both read back and use what is stored."""
        backend = self.store.backend
        raw = backend.get_bytes(self.SECRET_KEY)
        if raw is None:
            backend.put_if_absent(self.SECRET_KEY, secrets.token_hex(32).encode() + b"\n")
            for _ in range(10):  # read back what won (after S3's 409 the winning write may still be landing)
                if (raw := backend.get_bytes(self.SECRET_KEY)) is not None:
                    break
                time.sleep(0.2)
        try:
            key = bytes.fromhex((raw or b"").decode().strip())
        except (ValueError, UnicodeDecodeError):
            key = b""
        if len(key) < 32:
            raise ValueError(f"{self.uri}/{self.SECRET_KEY} does not hold a secret (64 hex digits); delete it and "
                             "the next ingress replica to start makes a new one")
        return key

    def rotate(self, now: float, keep_days: int) -> list[str]:
        """Delete the days of feedback older than `keep_days` (0: none); the days deleted."""
        if keep_days <= 0:
            return []
        oldest = time.strftime("%Y-%m-%d", time.gmtime(now - (keep_days - 1) * 86400))
        gone = [d for d in self.store.backend.list_dirs("") if _DAY.match(d) and d < oldest]
        for day in gone:
            self.store.backend.delete_prefix(day)
        return gone


_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_after: int


class FeedbackQuota:
    """What one ingress replica lets into the feedback store per UTC day: at most `per_client`
    items from one client and `max_bytes` in all, and one copy of a piece of feedback sent again
    (`seen`: what was stored for it). Decisions only; the route writes."""

    def __init__(self, per_client: int, max_bytes: int, *, max_clients: int = 100_000, remember: int = 10_000):
        self.per_client, self.max_bytes, self.max_clients = per_client, max_bytes, max_clients
        self.day, self.bytes = "", 0
        self.items: OrderedDict[str, int] = OrderedDict()
        self.seen = LRU(remember)

    def new_day(self, now: float) -> bool:
        """Start counting afresh on a new UTC day (also the first call); True when one began."""
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        if day == self.day:
            return False
        self.day, self.bytes = day, 0
        self.items.clear()
        return True

    def take(self, client: str, size: int, now: float) -> Refusal | None:
        """Count an item of `size` bytes from `client` in, or say why not (nothing counted)."""
        self.new_day(now)
        retry = int(86400 - now % 86400) + 1  # until the next UTC day
        if self.items.get(client, 0) >= self.per_client:
            return Refusal(429, "feedback_quota", f"feedback from this client is capped at {self.per_client} items a "
                           "day (UTC); retry tomorrow", retry)
        if self.bytes + size > self.max_bytes:
            return Refusal(503, "feedback_store_full", f"the feedback store took its {self.max_bytes} bytes for "
                           "today (UTC); retry tomorrow", retry)
        self.items[client] = self.items.pop(client, 0) + 1
        while len(self.items) > self.max_clients:
            self.items.popitem(last=False)
        self.bytes += size
        return None

    def give_back(self, client: str, size: int) -> None:
        """Undo a `take` whose write failed."""
        if self.items.get(client):
            self.items[client] -= 1
        self.bytes = max(0, self.bytes - size)


class _EngineCollector:
    """Exposes the last ChatModel status snapshot (refreshed at each scrape; None: unreachable)."""

    def __init__(self) -> None:
        self.status: EngineStatus | None = None

    def collect(self) -> Iterator[Metric]:
        st = self.status or EngineStatus()
        w, c = st.weights, st.counters
        yield GaugeMetricFamily("selflearn_model_ready", "1 if a model is loaded and answering", value=int(w.ready))
        info = GaugeMetricFamily("selflearn_model_checkpoint", "the checkpoint in service (value 1)",
                                 labels=["checkpoint", "dtype"])
        if w.checkpoint:
            info.add_metric([w.checkpoint, str(w.dtype)], 1)
        yield info
        yield GaugeMetricFamily("selflearn_model_degraded", "1 while the newest swap failed and old weights serve",
                                value=int(w.degraded))
        yield GaugeMetricFamily("selflearn_engine_queue_depth", "requests waiting for a batch slot",
                                value=st.queue_depth)
        yield GaugeMetricFamily("selflearn_engine_running", "requests decoding now", value=st.running)
        yield CounterMetricFamily("selflearn_swaps", "weights loaded and installed", value=c.swaps)
        yield CounterMetricFamily("selflearn_swap_failures", "checkpoint loads that failed (old weights kept)",
                                  value=c.swap_failures)
        yield CounterMetricFamily("selflearn_engine_generated_tokens", "tokens generated by the engine",
                                  value=c.generated_tokens)
        yield CounterMetricFamily("selflearn_engine_step_errors", "failed generation steps", value=c.step_errors)


class Metrics:
    ROUTES = {"/chat", "/chat/stream", "/v1/chat/completions", "/v1/models", "/feedback", "/metrics", "/status",
              "/healthz", "/readyz", "/"}

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("selflearn_http_requests", "HTTP requests", ["route", "code"], registry=r)
        self.latency = Histogram("selflearn_http_request_seconds", "HTTP request latency (streams: until the end)",
                                 ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160))
        self.ttft = Histogram("selflearn_time_to_first_token_seconds", "queue + prefill until the first token",
                              registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.generated = Counter("selflearn_generated_tokens", "completion tokens returned", registry=r)
        self.prompt = Counter("selflearn_prompt_tokens", "prompt tokens processed", registry=r)
        self.finished = Counter("selflearn_generations", "finished generations", ["finish_reason", "checkpoint"],
                                registry=r)
        self.inflight = Gauge("selflearn_inflight_requests", "generation requests in this ingress (queue depth)",
                              registry=r)
        self.rejected = Counter("selflearn_rejected_requests", "requests refused before generation", ["reason"],
                                registry=r)
        self.engine = _EngineCollector()
        r.register(self.engine)

    def route(self, path: str) -> str:
        return path if path in self.ROUTES else ("/static" if path.startswith("/static/") else "other")

    def observe_done(self, ev: Done) -> None:
        usage = ev.usage or {}
        self.generated.inc(usage.get("completion_tokens", 0))
        self.prompt.inc(usage.get("prompt_tokens", 0))
        self.finished.labels(ev.finish_reason, ev.checkpoint or "none").inc()
        if ev.ttft_ms is not None:
            self.ttft.observe(ev.ttft_ms / 1000)
