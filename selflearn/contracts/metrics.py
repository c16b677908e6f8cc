"""The round's metrics (`RoundMetrics`): what the trainer measured, read by the gate
(selflearn/policy.py), the operator's status, local mode's state and the dashboard."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ResultError(ValueError):
    """The round's result (or its metrics) is missing or cannot be read."""


class _Metrics(BaseModel):
    # Frozen: read, never edited. Unknown fields are ignored so that a manifest written by an older
    # or newer trainer still reads; a field the gate needs and cannot find fails the gate instead.
    model_config = ConfigDict(frozen=True, extra="ignore")


class Pair(_Metrics):
    """One figure for the parent weights (before) and the candidate (after), measured alike."""

    before: float | None = None
    after: float | None = None

    @property
    def known(self) -> bool:
        return self.before is not None and self.after is not None


class KnowledgeMetrics(_Metrics):
    """Scores in [0, 1] of greedy answers about the learned, held-out and general articles, asked
    in phrasings no round trains on (closed book: the weights alone), and about learned articles
    with the article's lead in the prompt (`open_book`: what the model makes of facts it can read)."""

    learned: Pair | None = None
    held_out: Pair | None = None
    general: Pair | None = None
    open_book: Pair | None = None
    # As serving answers: after what each model's own memory finds for the question (the parent's
    # memory does not hold this round's articles; the candidate's does).
    memory_learned: Pair | None = None
    memory_held_out: Pair | None = None
    # Questions asked per set: 0 means there was nothing to ask (no article yielded a question),
    # which the gate tells apart from a score that went missing.
    asked: dict[str, int] | None = None


class ChatMetrics(_Metrics):
    """Chat manners on the fixed retention prompts: reference perplexity and format health."""

    ppl: Pair | None = None
    retention: float | None = None  # parent's reference perplexity over the candidate's
    format_ok: Pair | None = None  # share of answers that end their turn without looping or drifting


class PreferenceMetrics(_Metrics):
    """How often the weights prefer the users' corrections on phrasings never trained."""

    before: float | None = None
    after: float | None = None
    pairs: int = 0


class FeedbackMetrics(_Metrics):
    """What the round did with its users' feedback."""

    corrections: int = 0
    ratings: int = 0
    pending: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    error: str | None = None  # the feedback store could not be read this round
    pairs: int = 0  # corrections with the answer they replace (preference pairs, held-out checks)
    judged: int = 0
    preference: PreferenceMetrics | None = None
    correction_steps: int | None = None
    correction_loss: float | None = None
    preference_steps: int | None = None


class RoundMetrics(_Metrics):
    """Everything a round measured: training, perplexity, answers, feedback, where time went."""

    train_loss: float | None = None
    losses: list[float] = Field(default_factory=list)  # per step; left out of the result line
    train_tokens: int | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    steps: int | None = None
    ppl: dict[str, Pair] = Field(default_factory=dict)  # fresh | trained | general
    articles: int | None = None
    held_out: int | None = None
    replayed: int | None = None
    dropped: int | None = None
    format: str | None = None
    qa_pairs: int | None = None
    chat_replayed: int | None = None
    qa_reviewed: int | None = None
    qa_read: int | None = None  # pairs asked after passages (training.qaReading)
    text_only: int | None = None
    examples_too_long: int | None = None
    knowledge: KnowledgeMetrics | None = None
    chat: ChatMetrics | None = None
    probe_seconds: float | None = None
    parent_probe_reused: bool | None = None
    feedback: FeedbackMetrics | None = None
    phase_seconds: dict[str, float] = Field(default_factory=dict)
    memory_passages: int | None = None  # passages in the checkpoint's memory (None: it keeps none)

    @classmethod
    def parse(cls, doc: Mapping[str, Any] | None, *, what: str = "round metrics") -> RoundMetrics:
        """The one parser of a metrics document (a result line, a manifest). Raises ResultError."""
        try:
            return cls.model_validate(dict(doc or {}))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ResultError(f"{what} are malformed: {where}: {first['msg']}") from None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def summary(self) -> RoundMetrics:
        """Without the per-step losses: what fits a termination message (4 KiB)."""
        return self.model_copy(update={"losses": []})

    def ppl_pair(self, name: str) -> Pair:
        return self.ppl.get(name) or Pair()
