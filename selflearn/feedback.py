"""Feedback, the one contract between `/feedback` (which writes it) and the trainer (which learns it).

A record is one JSON object under the feedback prefix (`<storage.uri>/<run>/feedback/` on a
cluster and in `selflearn local`), at `YYYY-MM-DD/<epoch ms>-<id>.json`, so keys sort by time and
a round's cursor is simply the last key it consumed. The serving side joins each rating with what
was asked and answered (prompt, reply, checkpoint) and a hash of the client; the trainer selects
what a round may learn with `select`, a pure function: caps per client, deduplication, the content
filter, and agreement between contradicting corrections.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import AbstractSet, Annotated, Any, Callable, Iterable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .validation import field_path, problem

MAX_CORRECTION_CHARS = 4000
MAX_PROMPT_CHARS = 20_000
_WS = re.compile(r"\s+")
_KEY = re.compile(r"^\d{4}-\d{2}-\d{2}/\d{13}-[A-Za-z0-9]{1,32}\.json$")


def feedback_uri(storage_uri: str, run: str) -> str:
    """Where a run's feedback lives: beside its checkpoints, in its own store."""
    return f"{storage_uri.rstrip('/')}/{run}/feedback"


def record_key(at: float, record_id: str) -> str:
    return f"{time.strftime('%Y-%m-%d', time.gmtime(at))}/{int(at * 1000):013d}-{record_id}.json"


def is_record_key(key: str) -> bool:
    return bool(_KEY.match(key))


def client_hash(client: str) -> str:
    """A client (API key or address) as stored: enough to cap and trace it, not to recover it."""
    return hashlib.sha256(b"selflearn-client\0" + client.encode()).hexdigest()[:16]


def answer_mac(secret: bytes, nonce: str, checkpoint: str | None, prompt: str, reply: str) -> str:
    """What a response id signs: any ingress replica holding the secret can check an answer a
    client sends back with its feedback, whichever replica gave it."""
    msg = json.dumps([nonce, checkpoint or "", prompt, reply], ensure_ascii=False).encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:20]


def _clean_correction(v: str) -> str:
    if not v.strip():
        raise ValueError("a correction must not be empty (leave it out to rate the answer only)")
    return v.strip()


# A correction, wherever one is taken in: stripped, not blank, not over-long.
Correction = Annotated[str, Field(max_length=MAX_CORRECTION_CHARS), AfterValidator(_clean_correction)]


def normalize(text: str) -> str:
    return _WS.sub(" ", text).strip().casefold()


class FeedbackRecord(BaseModel):
    """One stored piece of feedback. Older records (no client hash) still read."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=r"^[A-Za-z0-9]{1,32}$")
    at: float = Field(gt=0)
    rating: Literal["up", "down"]
    matched: bool = False
    response_id: str | None = None
    conversation_id: str | None = None
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    reply: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    checkpoint: str | None = None
    correction: Correction | None = None
    comment: str | None = None
    client: str | None = None

    def free_text(self) -> list[str]:
        """What people wrote that a round may learn or keep: the question, the correction, the
        comment, and the reply when it is rated up without a correction (then it is learned as a
        good answer); the content filter reads each of them."""
        texts = [self.prompt, self.correction, self.comment]
        if self.rating == "up" and not self.correction:
            texts.append(self.reply)
        return [t for t in texts if t]

    @property
    def kind(self) -> str:
        """correction | up | down."""
        return "correction" if self.correction else self.rating

    def digest(self) -> str:
        """What makes two records the same lesson: the question, the answer judged and the verdict."""
        what = [normalize(self.prompt or ""), normalize(self.reply or "") if not self.correction else "",
                self.kind, normalize(self.correction or "")]
        return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()

    def trace(self) -> dict[str, Any]:
        """What a manifest lists about a learned item (not its text)."""
        return {"id": self.id, "sha256": self.digest(), "client": self.client, "kind": self.kind,
                "at": self.at, "checkpoint": self.checkpoint}


def parse_record(raw: bytes) -> FeedbackRecord:
    """A stored object -> a record; ValueError with the reason for anything else."""
    try:
        return FeedbackRecord.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not JSON: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(problem(first, field_path(first, default="record"), plain=False)) from None


@dataclass
class Selection:
    """What one round does with the records it read."""

    corrections: list[FeedbackRecord] = field(default_factory=list)
    ratings: list[FeedbackRecord] = field(default_factory=list)
    # Keys left for a later round (a round's item cap, or too few ratings to learn from yet).
    pending: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)

    @property
    def learned(self) -> list[FeedbackRecord]:
        return self.corrections + self.ratings



def select(records: Iterable[tuple[str, FeedbackRecord]], *, learned_before: AbstractSet[str] = frozenset(),
           per_client_cap: int = 5, max_items: int = 200, min_ratings: int = 8,
           content_filter: Callable[[str], str | None] | None = None) -> Selection:
    """Choose what a round learns from (key, record) pairs, oldest first.

    In order: a record the server did not match to an answer it gave (`matched` false: a note on
    a conversation, or a response id that did not verify) is dropped, and so is one with no prompt
    and answer to learn from; so is one with any free text the content filter rejects (see
    `FeedbackRecord.free_text`) and one learned in an earlier round (`learned_before`: digests). Each
    client keeps its first `per_client_cap` items; the rest are dropped, not deferred, so a flood
    cannot steer later rounds either. Then, per question (corrections) or per answer (ratings),
    each client's latest item is its vote, and one item is learned when more than half the votes
    agree (none when they do not); the agreeing others are duplicates. Past `max_items` records
    wait for the next round, and ratings wait until at least `min_ratings` of them can be learned
    together.
    """
    out = Selection()
    per_client: Counter[str] = Counter()
    kept: list[tuple[str, FeedbackRecord]] = []
    for key, rec in sorted(records, key=lambda kr: kr[0]):
        if not rec.matched:
            out.dropped.append((rec.id, "unmatched: not an answer the server gave"))
            continue
        if not (rec.prompt and rec.prompt.strip()) or (rec.reply is None and not rec.correction):
            out.dropped.append((rec.id, "unmatched: no question and answer to learn from"))
            continue
        if content_filter and (why := next(filter(None, map(content_filter, rec.free_text())), None)):
            out.dropped.append((rec.id, f"content filter: {why}"))
            continue
        if rec.digest() in learned_before:
            out.dropped.append((rec.id, "learned before"))
            continue
        client = rec.client or "unknown"
        if per_client[client] >= per_client_cap:
            out.dropped.append((rec.id, f"over the per-client cap ({per_client_cap} a round)"))
            continue
        per_client[client] += 1
        kept.append((key, rec))
    kept = _agreed(kept, out)
    rated: list[tuple[str, FeedbackRecord]] = []
    for i, (key, rec) in enumerate(kept):
        if i >= max_items:
            out.pending.append(key)
        elif rec.correction:
            out.corrections.append(rec)
        else:
            rated.append((key, rec))
    if len(rated) < min_ratings:
        out.pending += [k for k, _ in rated]
    else:
        out.ratings = [r for _, r in rated]
    out.pending.sort()
    return out


def _verdict(rec: FeedbackRecord) -> str:
    return normalize(rec.correction) if rec.correction else rec.rating


def _agreed(kept: list[tuple[str, FeedbackRecord]], out: Selection) -> list[tuple[str, FeedbackRecord]]:
    """One item per question (corrections) or per answer (ratings), when the clients agree."""
    groups: dict[tuple, list[tuple[str, FeedbackRecord]]] = defaultdict(list)
    for kr in kept:
        rec = kr[1]
        groups[("c", normalize(rec.prompt or "")) if rec.correction else
               ("r", normalize(rec.prompt or ""), normalize(rec.reply or ""))].append(kr)
    keep: set[str] = set()
    for items in groups.values():
        votes: dict[str, FeedbackRecord] = {}
        for _, rec in items:  # oldest first: a client's latest item is its vote
            votes[rec.client or "unknown"] = rec
        (top, n), = Counter(_verdict(r) for r in votes.values()).most_common(1)
        agreed = n * 2 > len(votes)
        if agreed:
            keep.add([r for r in votes.values() if _verdict(r) == top][-1].id)
        for _, rec in items:
            if rec.id in keep:
                continue
            if not agreed:
                why = "contradicted: no majority among the clients' corrections"
            elif _verdict(rec) == top:
                why = "duplicate"
            elif votes.get(rec.client or "unknown") is not rec:
                why = "superseded: the same client's later feedback counts"
            else:
                why = "contradicted: the majority of clients said otherwise"
            out.dropped.append((rec.id, why))
    return [kr for kr in kept if kr[1].id in keep]
