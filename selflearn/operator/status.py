"""The LearnerRun's status, defined once: what the operator writes to Kubernetes and reads back.

The CRD's status schema is generated from these models (crd.py, `make manifests`); the reconciler
reads and writes their typed fields; `StoredStatus.read` is the one parser of a stored status and
`StoredStatus.changes` what a handler patches. Field names are the manifest's (camelCase aliases,
as in spec.py): `kubectl get lr`, docs/kubernetes.md and the e2e scenario read them.

A status written by another version of the operator may hold what this one cannot read (the API
server keeps values an older CRD allowed). What the operator rewrites anyway is dropped, and
removed on its next write: a history row or condition it does not know, or an unreadable phase,
message, lastPerplexity or observedGeneration. The round's progress is not guessed: a wrong round
would start a round again or skip one, a wrong servingCheckpoint would serve other weights; so an
unreadable progress field is refused, in one line naming it, and the run waits until it is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Annotated, Any, Iterable, Literal, Mapping

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, SerializerFunctionWrapHandler,
                      ValidationError, WithJsonSchema, model_serializer)
from pydantic.alias_generators import to_camel

from ..validation import ErrorDetails, field_path, problem

Phase = Literal["Pending", "Training", "Retrying", "Serving", "Suspended", "Failed"]
# A history row's result: the gate's outcome (scheduling.history_result), or what happened instead.
HistoryResult = Literal["promoted", "rejected", "pinned", "empty", "failed"]
ConditionType = Literal["Ready", "TrainerRunning", "Degraded"]


def iso(t: datetime) -> str:
    """The status's timestamps: UTC, microseconds, `Z`."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # a time without a zone in a status is UTC


Timestamp = Annotated[datetime, AfterValidator(_utc), PlainSerializer(iso, return_type=str, when_used="json")]
Int64 = Annotated[int, WithJsonSchema({"type": "integer", "format": "int64"})]  # as Kubernetes types generations


class _Status(BaseModel):
    # Unknown fields are ignored: Kopf and older operators may have left some beside ours.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class _Row(_Status):
    """A list item: a value, never edited; a field without a value is left out (not written as null)."""

    model_config = ConfigDict(frozen=True)

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class HistoryRow(_Row):
    """One finished attempt of a round."""

    round: int
    attempt: int
    job: str
    result: HistoryResult
    checkpoint: str | None = None
    train_loss: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    knowledge_before: float | None = Field(
        None, description="Parent's score answering questions about the round's articles.")
    knowledge_after: float | None = Field(None, description="The candidate's score on the same questions.")
    chat_retention: float | None = Field(
        None, description="Parent's perplexity of the reference chat answers over the candidate's.")
    format_health: float | None = Field(
        None, description="Share of chat prompts the candidate answered in good format.")
    promoted: bool
    reason: str
    finished_at: Timestamp


class Condition(_Row):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: Timestamp | None = None
    observed_generation: Int64 | None = None


@dataclass(frozen=True)
class Progress:
    """The part of the status the next round is decided from (scheduling.py). Field names are the
    status's own, so that `LearnerRunStatus.progress` and `set_progress` map them one to one."""

    round: int = 0  # the round running now, or the last one run (0: none yet)
    active_job: str | None = None  # the running round's Job
    failures: int = 0  # consecutive failed attempts of `round` (0 once it succeeds)
    next_round_at: datetime | None = None  # no Job starts before this: the interval, or the backoff
    serving_checkpoint: str | None = None  # what serves (None: the base model); the next round's parent


class LearnerRunStatus(_Status):
    """Progress lives here, so a restarted operator carries on where it stopped."""

    # The operator's working copy during one handler call: fields are assigned (and validated) in
    # place; lists are tuples, so that a change is an assignment `StoredStatus.changes` sees.
    model_config = ConfigDict(validate_assignment=True)

    phase: Phase | None = None
    message: str | None = Field(None, description="Why the run is in its phase, in a sentence.")
    round: int = Field(0, ge=0, description="The round running now, or the last one run.")
    active_job: str | None = Field(None, description="The trainer Job of the running round.")
    failures: int = Field(0, ge=0, description="Consecutive failed attempts of the current round.")
    next_round_at: Timestamp | None = Field(
        None, description="No round starts before this time (interval or retry backoff).")
    serving_checkpoint: str | None = Field(None, description="What the RayService serves (null: the base model).")
    last_perplexity: float | None = Field(
        None, description="General-set perplexity after the newest published round.")
    observed_generation: Int64 | None = None
    history: tuple[HistoryRow, ...] = Field((), description="The newest rounds, oldest first (bounded).")
    conditions: tuple[Condition, ...] = ()

    @property
    def progress(self) -> Progress:
        return Progress(round=self.round, active_job=self.active_job, failures=self.failures,
                        next_round_at=self.next_round_at, serving_checkpoint=self.serving_checkpoint)

    def set_progress(self, p: Progress) -> None:
        self.round, self.active_job, self.failures = p.round, p.active_job, p.failures
        self.next_round_at, self.serving_checkpoint = p.next_round_at, p.serving_checkpoint

    def record(self, row: HistoryRow, *, keep: int) -> None:
        """A finished attempt: history keeps the newest `keep` rows (a status must stay small), and
        lastPerplexity follows the newest round that measured one (a published round)."""
        self.history = (*self.history, row)[-max(keep, 1):]
        if row.perplexity_after is not None:
            self.last_perplexity = row.perplexity_after

    def stored(self) -> dict[str, Any]:
        """The fields read or assigned so far, as JSON (what the LearnerRun holds, or will)."""
        doc = self.model_dump(by_alias=True, mode="json")
        return {ALIASES[name]: doc[ALIASES[name]] for name in self.model_fields_set}


ALIASES = {name: info.alias or name for name, info in LearnerRunStatus.model_fields.items()}
# Refused rather than dropped when unreadable (see the module's docstring).
PROGRESS_FIELDS = frozenset(ALIASES[f.name] for f in fields(Progress))
_LISTS = frozenset(ALIASES[name] for name in ("history", "conditions"))


# Stands for a stored value that could not be read: equal to nothing, so the next write replaces it.
_UNREADABLE: Any = object()


@dataclass
class StoredStatus:
    """A LearnerRun's status as read at the start of a handler call, and what changed since."""

    status: LearnerRunStatus  # the typed working copy the handler edits
    dropped: tuple[str, ...] = ()  # what could not be read and is removed on the next write, a line each
    refused: str | None = None  # why the round's progress cannot be read: nothing may act on it
    _before: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, doc: Mapping[str, Any] | None) -> StoredStatus:
        raw = dict(doc or {})
        problems: list[tuple[str, str]] = []  # (field, what is wrong with it)
        while True:  # each pass removes at least one field or row, so this ends
            try:
                status = LearnerRunStatus.model_validate(raw)
                break
            except ValidationError as err:
                raw = _without(raw, err.errors(), problems)
        before = status.stored()
        # A dropped field or row is removed on the next write; a refused one stays, for a person to fix.
        before.update({key: _UNREADABLE for key, _ in problems if key not in PROGRESS_FIELDS})
        refused = [line for key, line in problems if key in PROGRESS_FIELDS]
        why = ("; ".join(refused) + ": the operator cannot tell which round comes next or what serves; fix it "
               "with kubectl patch --subresource=status, or delete the run") if refused else None
        return cls(status, tuple(line for key, line in problems if key not in PROGRESS_FIELDS), why, before)

    def changes(self) -> dict[str, Any]:
        """The status fields to patch: those whose JSON differs from what is stored (null removes one)."""
        now = self.status.stored()
        return {k: now.get(k) for k in sorted(self._before.keys() | now.keys())
                if now.get(k) != self._before.get(k)}


def _without(raw: dict[str, Any], errors: Iterable[ErrorDetails], problems: list[tuple[str, str]]) -> dict[str, Any]:
    """`raw` without the fields (or list rows) `errors` name; each problem is noted as (field, line)."""
    out = dict(raw)
    rows: dict[str, set[int]] = {}
    for e in errors:
        key, rest = str(e["loc"][0]), e["loc"][1:]
        problems.append((key, problem(e, "status." + field_path(e)) + f" (found {repr(e['input'])[:80]})"))
        if key in _LISTS and rest and isinstance(rest[0], int) and isinstance(out.get(key), list):
            rows.setdefault(key, set()).add(rest[0])
        else:
            out.pop(key, None)
    for key, bad in rows.items():
        if key in out:
            out[key] = [row for i, row in enumerate(out[key]) if i not in bad]
    return out
