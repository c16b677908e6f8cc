"""The feedback source: what `/feedback` stored since the last round that read it.

Records live one JSON object each under the run's feedback prefix (selflearn.feedback has the
layout). A round lists the keys after its cursor, reads and validates each, and selects what it
may learn (selflearn.feedback.select); the cursor it persists is the last key it read plus the keys
left for a later round, so an item is read once and learned at most once. The grace period skips
keys a writer may still be landing: keys sort by the time `/feedback` stamped them, not by when
the write finished.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Mapping, Sequence

from ..checkpoints import CheckpointStore
from ..feedback import FeedbackRecord, feedback_uri, is_record_key, parse_record, record_key
from ..spec import FeedbackSource, StorageSpec

log = logging.getLogger("selflearn.sources.feedback")

MAX_PENDING = 2000  # keys a cursor carries for later rounds; the oldest beyond it are dropped


@dataclass
class FeedbackRead:
    records: list[tuple[str, FeedbackRecord]] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    cursor: dict[str, Any] = field(default_factory=dict)


class FeedbackReader:
    name = "feedback"

    def __init__(self, store: CheckpointStore, prefix: str = ""):
        self.store, self.prefix = store, prefix.strip("/")
        self.uri = f"{store.uri}/{self.prefix}" if self.prefix else store.uri

    @classmethod
    def for_run(cls, uri: str | None, run_store: CheckpointStore, run: str, *, endpoint: str | None = None,
                region: str | None = None) -> "FeedbackReader":
        """The run's own feedback (`uri` None or inside the run's store), or another store's."""
        uri = (uri or feedback_uri(run_store.uri, run)).rstrip("/")
        if uri == run_store.uri or uri.startswith(run_store.uri + "/"):
            return cls(run_store, uri[len(run_store.uri):])
        return cls(CheckpointStore.from_uri(uri, endpoint=endpoint, region=region))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, cursor: dict[str, Any], *, grace_seconds: float = 5, now: float | None = None) -> FeedbackRead:
        """Records after `cursor["after"]` and those it left pending, up to `now - grace_seconds`."""
        after = str(cursor.get("after") or "")
        until = record_key((now or time.time()) - grace_seconds, "")[:-len(".json")]  # ".../<ms>-"
        pending = [k for k in cursor.get("pending") or [] if isinstance(k, str)]
        fresh = [k for k in self.store.backend.list_files(self.prefix)
                 if is_record_key(k) and k > after and k < until]
        out = FeedbackRead(cursor={"after": max([after, *fresh]), "pending": []})
        for key in sorted(set(pending) | set(fresh)):
            raw = self.store.backend.get_bytes(self._key(key))
            if raw is None:
                out.invalid.append((key, "gone"))
                continue
            try:
                out.records.append((key, parse_record(raw)))
            except ValueError as err:
                out.invalid.append((key, str(err)))
        return out

    @staticmethod
    def next_cursor(read: FeedbackRead, pending: list[str]) -> dict[str, Any]:
        """The cursor after a round left `pending` for later."""
        if len(pending) > MAX_PENDING:
            log.warning("%d feedback items wait for a later round; the oldest %d are dropped",
                        len(pending), len(pending) - MAX_PENDING)
        return {"after": read.cursor["after"], "pending": sorted(pending)[-MAX_PENDING:]}


@dataclass
class FeedbackRound:
    """What a round takes from the feedback source."""

    corrections: list[FeedbackRecord] = field(default_factory=list)
    ratings: list[FeedbackRecord] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (id or key, reason)
    pending: int = 0
    cursor: dict[str, Any] | None = None  # None: leave the cursor as it was (the store failed)
    error: str | None = None
    keys: dict[str, str] = field(default_factory=dict)  # record id -> its key

    def traces(self) -> list[dict[str, Any]]:
        """What the manifest lists of each item learned."""
        return [{**rec.trace(), "key": self.keys.get(rec.id)} for rec in self.learned]

    @property
    def learned(self) -> list[FeedbackRecord]:
        return self.corrections + self.ratings

    def summary(self) -> dict[str, Any]:
        """The round's metrics about feedback."""
        if self.error:
            return {"error": self.error, "corrections": 0, "ratings": 0}
        dropped: dict[str, int] = {}
        for _, why in self.dropped:
            kind = why.split(":")[0].split(" (")[0]
            dropped[kind] = dropped.get(kind, 0) + 1
        return {"corrections": len(self.corrections), "ratings": len(self.ratings), "pending": self.pending,
                "dropped": dropped}


@dataclass(frozen=True)
class FeedbackHistory:
    """What the run's rounds did with feedback before this one."""

    learned: AbstractSet[str] = frozenset()  # digests of the feedback the parent's line of checkpoints learned
    retry: Mapping[str, int] = field(default_factory=dict)  # keys only rejected candidates learned: times tried


def collect(source: FeedbackSource, run_store: CheckpointStore, run: str, cursor: dict[str, Any], *,
            history: FeedbackHistory = FeedbackHistory(), blocklist: Sequence[str] = (),
            storage: StorageSpec | None = None) -> FeedbackRound:
    """Read and select a round's feedback. Keys a rejected candidate learned once are offered once
    more (`history.retry`). `storage`: the run's store settings, whose endpoint and region reach a
    feedback store outside the run's. A store that cannot be read makes a round without feedback,
    which says why; the cursor then stays put."""
    from ..feedback import select
    from ..serving.safety import text_filter
    from .pipeline import DEFAULT_BLOCKLIST

    try:
        reader = FeedbackReader.for_run(source.uri, run_store, run, endpoint=storage.endpoint if storage else None,
                                        region=storage.region if storage else None)
        again = [k for k, n in history.retry.items() if n == 1]
        read = reader.read({**cursor, "pending": [*(cursor.get("pending") or []), *again]},
                           grace_seconds=source.grace_seconds)
    except Exception as err:  # unreachable, denied, misconfigured: the round goes on without it
        why = f"feedback store unavailable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("%s; this round learns no feedback", why)
        return FeedbackRound(error=why.strip().rstrip(":"))
    # Again, whatever /feedback checked: the round's blocklist may differ from serving's, and the
    # same rules (control tokens, injection phrases, whitespace and Unicode folded) on every text.
    sel = select(read.records, learned_before=set(history.learned), per_client_cap=source.per_client_cap,
                 max_items=source.max_items, min_ratings=source.min_ratings,
                 content_filter=text_filter(list(DEFAULT_BLOCKLIST) + list(blocklist)))
    out = FeedbackRound(corrections=sel.corrections, ratings=sel.ratings, pending=len(sel.pending),
                        dropped=[(k, f"invalid: {why}") for k, why in read.invalid] + sel.dropped,
                        cursor=FeedbackReader.next_cursor(read, sel.pending),
                        keys={rec.id: key for key, rec in read.records})
    log.info("feedback: %d corrections and %d ratings to learn, %d dropped, %d waiting for a later round",
             len(out.corrections), len(out.ratings), len(out.dropped), out.pending)
    return out
