"""What local mode keeps of one finished round: `RoundRecord`, built from the trainer's result and
what it reads of the checkpoint's manifest (`RoundManifest`, the one parser of those fields here).

Both are frozen: a record is made once, when its round is decided, and replaced (never edited)
when serving reaches its checkpoint. Their JSON is what the dashboard (`web/index.html`) and
`selflearn status` read, inside the state file: the field names are that page's contract.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Iterable, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, computed_field

from ..contracts import ChatMetrics, FeedbackMetrics, KnowledgeMetrics, Pair, ResultError, RoundMetrics, \
    RoundResult, checkpoint_id_of_uri
from ..policy import Decision, Outcome
from ..validation import one_line

MAX_LOSS_POINTS = 400  # per round, in the state file (the manifest keeps all of them)


class _Doc(BaseModel):
    # Unknown fields are ignored: a state file or manifest written by an older or newer version
    # still reads.
    model_config = ConfigDict(frozen=True, extra="ignore")


def finite(xs: Iterable[float | None]) -> list[float]:
    """A loss curve without its NaN and infinite points: JSON has no such numbers (they would be
    written as null and no longer read as floats), and the dashboard skips them anyway."""
    return [x for x in xs if x is not None and math.isfinite(x)]


def _finite_curve(xs: Any) -> Any:
    return finite(xs) if isinstance(xs, (list, tuple)) else xs


LossCurve = Annotated[tuple[float, ...], BeforeValidator(_finite_curve)]  # as stored: finite points only


def downsample(xs: tuple[float, ...] | list[float], n: int) -> tuple[float, ...]:
    """At most `n` points of `xs`, evenly spaced (a loss curve the dashboard can draw)."""
    if len(xs) <= n:
        return tuple(xs)
    step = len(xs) / n
    return tuple(xs[int(i * step)] for i in range(n))


class ArticleRecord(_Doc):
    """An article a round learned, as the dashboard links it (its text stays in the store)."""

    title: str | None = None
    url: str | None = None
    sha256: str | None = None


class ProbeExample(_Doc):
    """One question about a learned article with the parent's and the candidate's answer."""

    question: str
    parent: str
    candidate: str
    parent_score: float | None = None  # None: not a finite number
    candidate_score: float | None = None


class FeedbackItem(_Doc):
    id: str | None = None


class Probe(_Doc):
    examples: tuple[ProbeExample, ...] = ()  # a few, chosen by the trainer


class RoundManifest(_Doc):
    """What local mode reads of a published checkpoint's manifest (`checkpoints.py` writes it)."""

    parent: str | None = None
    published_at: float | None = None
    metrics: RoundMetrics = Field(default_factory=RoundMetrics)
    articles: tuple[ArticleRecord, ...] = ()
    feedback: tuple[FeedbackItem, ...] = ()
    probe: Probe = Field(default_factory=Probe)

    @classmethod
    def parse(cls, doc: Mapping[str, Any] | None, *, what: str = "the manifest") -> RoundManifest:
        """Raises ResultError (one line) when a field local mode reads is malformed."""
        try:
            return cls.model_validate(dict(doc or {}))
        except ValidationError as err:
            raise ResultError(f"{what} is malformed: {one_line(err.errors()[:1])}") from None


class RoundFeedback(FeedbackMetrics):
    """The round's feedback figures and which items it learned (ids as /feedback answered them)."""

    ids: tuple[str | None, ...] = ()


class RoundRecord(_Doc):
    """What the dashboard and `selflearn status` show about one round."""

    round: int
    status: str  # published | empty | failed (contracts.ROUND_STATUSES)
    checkpoint: str | None = None
    id: str | None = None
    parent: str | None = None
    outcome: Outcome | None = None  # None: nothing was decided (an empty or failed round)
    reason: str | None = None
    train_loss: float | None = None
    losses: LossCurve = ()
    ppl: dict[str, Pair] = Field(default_factory=dict)
    steps: int | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    articles: tuple[ArticleRecord, ...] = ()
    held_out: int | None = None
    dropped: int | None = None
    # What a chat user notices: answers about the learned and held-out articles, chat manners.
    knowledge: KnowledgeMetrics | None = None
    chat: ChatMetrics | None = None
    format: str | None = None
    qa_pairs: int | None = None
    feedback: RoundFeedback | None = None  # None: the run has no feedback source
    examples: tuple[ProbeExample, ...] = ()
    published_at: float | None = None
    finished_at: float | None = None
    publish_to_serve_s: float | None = None  # set once serving answers with this round's checkpoint

    @computed_field  # type: ignore[prop-decorator]
    @property
    def promoted(self) -> bool:
        """In the JSON for the page and the bench scripts; derived from the outcome, never stored apart."""
        return self.outcome is Outcome.PROMOTE

    @classmethod
    def of(cls, result: RoundResult, manifest: RoundManifest | None, decision: Decision | None,
           *, now: float) -> RoundRecord:
        """The record of a round from its result, its manifest (None: nothing published) and its decision."""
        manifest = manifest or RoundManifest()
        m = result.metrics or RoundMetrics()
        # The result line leaves the per-step losses out: the manifest has them.
        losses = finite(m.losses or manifest.metrics.losses)
        feedback = None if m.feedback is None else RoundFeedback(
            **m.feedback.model_dump(), ids=tuple(f.id for f in manifest.feedback))
        return cls(
            round=result.round, status=result.status, checkpoint=result.checkpoint,
            id=result.id or (checkpoint_id_of_uri(result.checkpoint) if result.checkpoint else None),
            parent=result.parent or manifest.parent,
            outcome=decision.outcome if decision else None,
            reason=decision.reason if decision else result.reason,
            train_loss=m.train_loss, losses=downsample(losses, MAX_LOSS_POINTS), ppl=dict(m.ppl), steps=m.steps,
            train_seconds=m.train_seconds, tokens_per_s=m.tokens_per_s, articles=manifest.articles,
            held_out=m.held_out, dropped=m.dropped, knowledge=m.knowledge, chat=m.chat, format=m.format,
            qa_pairs=m.qa_pairs, feedback=feedback, examples=manifest.probe.examples,
            published_at=manifest.published_at, finished_at=now)
