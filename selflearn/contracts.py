"""What crosses a process or component boundary, defined once.

- **The round result**: the one JSON line `selflearn train` prints and writes to the termination
  message file, which the operator parses and local mode reads from the trainer's stdout:

      {"status": "published", "round": 7, "checkpoint": "s3://b/p/run/r000007", "id": "run/r000007",
       "parent": "s3://b/p/run/r000006", "metrics": {"train_loss": 2.1, "ppl": {...}, ...}}
      {"status": "empty", "round": 7, "reason": "no new articles"}
      {"status": "failed", "round": 7, "reason": "training.maxLength 4096 exceeds ..."}

- **The round's metrics** (`RoundMetrics`): what the trainer measured, read by the gate
  (selflearn/policy.py), the operator's status, local mode's state and the dashboard. The trainer
  builds it, everyone else reads its fields: a renamed field is a type error, not a gate check
  that silently stops running.
- **A running round's progress**: the trainer's typed events (`PhaseStarted`, `StepDone`) to its
  listeners in process, and `RoundProgress`, the small JSON document the trainer keeps in its
  `--progress-file` for local mode's dashboard and terminal.
- **Checkpoint ids**: a round's directory `r000007`, its short id `<run>/r000007` (the
  `X-Selflearn-Checkpoint` header, the dashboard, the manifest), and `base:<model>` for the
  untrained base model.
- **Engine events**: what one generation streams from the engine to the HTTP layer (possibly
  through Ray): one `Start`, `Token`s, then `Done` or `Error` (`Completion`: the whole answer).
- **The engine's request and status**: what the ingress asks the model replica for
  (`EngineRequest`: messages and `RequestParams`) and what the replica says about itself
  (`EngineStatus`: its weights, queue and counters; `/status` and `/readyz` show it).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# -- the round's metrics -----------------------------------------------------------------------------


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
    """Scores in [0, 1] of greedy answers about the learned, held-out and general articles."""

    learned: Pair | None = None
    held_out: Pair | None = None
    general: Pair | None = None
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
    text_only: int | None = None
    examples_too_long: int | None = None
    knowledge: KnowledgeMetrics | None = None
    chat: ChatMetrics | None = None
    probe_seconds: float | None = None
    parent_probe_reused: bool | None = None
    feedback: FeedbackMetrics | None = None
    phase_seconds: dict[str, float] = Field(default_factory=dict)

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

# -- the round result ------------------------------------------------------------------------------

TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "SELFLEARN_TERMINATION_LOG"  # set to write the result line elsewhere (tests, Docker)
TERMINATION_MESSAGE_LIMIT = 4096  # bytes Kubernetes keeps of a termination message
ROUND_STATUSES = ("published", "empty", "failed")


class ResultError(ValueError):
    """The round's result is missing or cannot be read."""


@dataclass(frozen=True)
class RoundResult:
    status: str  # published | empty | failed
    round: int
    checkpoint: str | None = None  # the checkpoint's URI
    metrics: RoundMetrics | None = None
    reason: str | None = None  # why a round is empty or failed
    id: str | None = None  # the checkpoint's short id, <run>/r000007
    parent: str | None = None  # the URI it was trained from; None: the base model

    def __post_init__(self) -> None:
        if self.status not in ROUND_STATUSES:
            raise ResultError(f"unknown result status {self.status!r}")

    def to_json(self) -> dict[str, Any]:
        doc = {"status": self.status, "round": self.round, "checkpoint": self.checkpoint,
               "metrics": self.metrics.to_json() if self.metrics is not None else None,
               "reason": self.reason, "id": self.id, "parent": self.parent}
        return {k: v for k, v in doc.items() if v is not None}

    def to_line(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, round_: int | None = None) -> RoundResult:
        """Validate a result document; `round_` if given must match. Raises ResultError."""
        status = doc.get("status")
        if status not in ROUND_STATUSES:
            raise ResultError(f"unknown result status {status!r}")
        if round_ is not None and doc.get("round") != round_:
            raise ResultError(f"the result is for round {doc.get('round')!r}, expected {round_}")
        if not isinstance(doc.get("round"), int):
            raise ResultError(f"the result has no round number (got {doc.get('round')!r})")
        if status == "published":
            if not isinstance(doc.get("checkpoint"), str) or not doc["checkpoint"]:
                raise ResultError("a published result has no checkpoint URI")
            if not isinstance(doc.get("metrics"), dict):
                raise ResultError("a published result has no metrics")
            return cls("published", doc["round"], checkpoint=doc["checkpoint"],
                       id=doc.get("id") or checkpoint_id_of_uri(doc["checkpoint"]), parent=doc.get("parent"),
                       metrics=RoundMetrics.parse(doc["metrics"], what="the result's metrics"))
        return cls(status, doc["round"], reason=str(doc.get("reason") or status))

    @classmethod
    def from_line(cls, message: str | None, *, round_: int | None = None) -> RoundResult:
        """The result in a termination message or a trainer's stdout: the last line that is a JSON
        object with a `status` (a crashed trainer may leave its log tail around it)."""
        if not message or not message.strip():
            raise ResultError("the trainer left no termination message")
        doc = result_line(message)
        if doc is None:
            last = message.strip().splitlines()[-1].strip()
            raise ResultError(f"no result line in the termination message (last line: {last[:200]!r})")
        return cls.from_json(doc, round_=round_)


def result_line(message: str) -> dict[str, Any] | None:
    """The last line of `message` that is a JSON object with a `status`, else None."""
    for line in reversed(message.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict) and "status" in doc:
                return doc
    return None


def write_termination_log(line: str) -> None:
    """Write the result line where Kubernetes reads it: the termination message file when the
    process runs in a pod (the file exists) or `$SELFLEARN_TERMINATION_LOG` names one."""
    path = os.environ.get(TERMINATION_LOG_ENV, TERMINATION_LOG)
    if os.path.exists(os.path.dirname(path) or ".") and (os.path.exists(path) or TERMINATION_LOG_ENV in os.environ):
        try:
            Path(path).write_text(line[:TERMINATION_MESSAGE_LIMIT])
        except OSError:
            pass


# -- a running round's progress ------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseStarted:
    """The round entered a phase: loading, evaluating the parent, training, learning corrections, ..."""
    phase: str


@dataclass(frozen=True)
class StepDone:
    """One optimizer step of a training phase (`kind`: train | corrections | preference)."""
    step: int
    of: int
    loss: float
    kind: str = "train"
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None


ProgressEvent = Union[PhaseStarted, StepDone]


class RoundProgress(BaseModel):
    """The progress file's document (`selflearn train --progress-file`): the newest phase and step."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    phase: str = "starting"
    step: int | None = None
    of: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    started_at: float | None = None
    updated_at: float | None = None

    def after(self, event: ProgressEvent, now: float) -> RoundProgress:
        """This document once `event` happened (a new one: documents are never edited). A new phase
        has taken no step yet: the previous phase's step, loss and ETA are not its own."""
        if isinstance(event, PhaseStarted):
            return self.model_copy(update={"phase": event.phase, "step": None, "of": None, "loss": None,
                                           "tokens_per_s": None, "eta_s": None, "updated_at": now})
        return self.model_copy(update={"step": event.step, "of": event.of, "loss": event.loss,
                                       "tokens_per_s": event.tokens_per_s, "eta_s": event.eta_s, "updated_at": now})

    def to_json(self) -> dict[str, Any]:
        """The progress file's document: the fields known so far (an unknown one is left out)."""
        return self.model_dump(mode="json", exclude_none=True)


# -- checkpoint ids --------------------------------------------------------------------------------

BASE_PREFIX = "base:"
_ROUND_DIR = re.compile(r"^r(\d{6,})$")
# file:///path/<run>/r000007 or s3://bucket/prefix/<run>/r000007
CHECKPOINT_URI_RE = re.compile(r"^(file|s3)://.+/[^/]+/r\d{6,}/?$")


def round_dir(round_: int) -> str:
    """A round's directory under its run: `r000007`."""
    return f"r{round_:06d}"


def parse_round_dir(name: str) -> int | None:
    """`r000007` -> 7; anything else -> None."""
    m = _ROUND_DIR.match(name)
    return int(m.group(1)) if m else None


def checkpoint_id(run: str, round_: int) -> str:
    """The short id users see: `<run>/r000007`."""
    return f"{run}/{round_dir(round_)}"


def checkpoint_id_of_uri(uri: str) -> str:
    """`s3://b/p/run/r000007` -> `run/r000007` (a URI not in that form is its own id)."""
    parts = uri.rstrip("/").rsplit("/", 2)
    return "/".join(parts[-2:]) if len(parts) == 3 and parse_round_dir(parts[-1]) is not None else uri


def base_id(model: str) -> str:
    """The id of an untrained base model: `base:<model>`."""
    return f"{BASE_PREFIX}{model}"


# -- engine events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The request got a batch slot on `checkpoint`."""
    checkpoint: str
    prompt_tokens: int
    dropped_messages: int = 0  # oldest turns left out to fit the context
    queue_ms: float = 0.0


@dataclass(frozen=True)
class Token:
    """More of the answer's text (several tokens' worth when the reader is slow)."""
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length | content_filter
    text: str
    checkpoint: str | None = None
    usage: dict[str, int] | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None


@dataclass(frozen=True)
class Error:
    status: int  # the HTTP status it maps to: 422 bad request, 503 busy or unavailable, 504 timeout
    message: str
    code: str | None = None  # the error body's `code`, e.g. context_length_exceeded
    param: str | None = None  # the request field it is about, in the engine request's terms (`messages`)


EngineEvent = Union[Start, Token, Done, Error]
END_EVENTS = (Done, Error)



@dataclass(frozen=True)
class Completion:
    """A whole answer: the `Start` event (None if the request never got a batch slot) and its end."""
    start: Start | None
    end: Done | Error


# -- the engine's request and status -----------------------------------------------------------------
# Both cross Ray between the ingress and the model replica (pickled), so they are frozen dataclasses
# of plain values. The engine builds the status; `/status` shows `EngineStatus.to_json()` as is.

Message = dict[str, str]  # {"role": system | developer | user | assistant, "content": ...}: the chat template's


@dataclass(frozen=True)
class RequestParams:
    """What one request asks of the sampler; None takes the deployment's default (`generation` in the
    ChatModel's user_config). `max_new_tokens` is capped by `engine.max_new_tokens_cap`."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None


@dataclass(frozen=True)
class EngineRequest:
    """One generation: the conversation so far, the newest user message last, and its parameters."""
    messages: tuple[Message, ...]
    params: RequestParams = field(default_factory=RequestParams)


@dataclass(frozen=True)
class WeightsStatus:
    """Which weights answer, which the user_config asks for, and why those differ (`degraded`)."""
    ready: bool = False  # weights are loaded: requests get answers
    checkpoint: str | None = None  # the id of what answers: <run>/r000007 or base:<model>
    checkpoint_uri: str | None = None
    base_model: str | None = None
    dtype: str | None = None
    chat_template: bool | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    loading: str | None = None  # the id being loaded now
    desired: str | None = None  # the id asked for while it is not yet (or cannot be) the one serving
    degraded: bool = False  # what answers (if anything) is not what was asked for
    degraded_reason: str | None = None


@dataclass
class EngineCounters:
    """One engine's running totals. Mutable: the engine adds to them; a status carries a copy."""
    requests: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    swaps: int = 0
    swap_failures: int = 0
    last_swap_error: str | None = None
    last_swap_error_at: float | None = None
    last_swap_seconds: float | None = None
    step_errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass(frozen=True)
class BatchStatus:
    checkpoint: str  # the weights its rows decode on
    rows: int


@dataclass(frozen=True)
class EngineStatus:
    """The model replica's status (`ChatModel.status`): its weights, its queue, its counters."""
    weights: WeightsStatus = field(default_factory=WeightsStatus)
    queue_depth: int = 0  # requests waiting for a batch slot
    running: int = 0  # requests decoding now
    batches: tuple[BatchStatus, ...] = ()
    generation_defaults: dict[str, int | float | list[str]] = field(default_factory=dict)
    counters: EngineCounters = field(default_factory=EngineCounters)

    @property
    def unready_reason(self) -> str | None:
        """Why no weights answer (None: they do), in the words of the failure that left none."""
        if self.weights.ready:
            return None
        return self.weights.degraded_reason or self.counters.last_swap_error or "no weights are loaded yet"

    def to_json(self) -> dict[str, Any]:
        """One flat document, `/status`'s `model`: the weights' fields, the queue's, the counters'."""
        return {**asdict(self.weights), "queue_depth": self.queue_depth, "running": self.running,
                "batches": [asdict(b) for b in self.batches], "generation_defaults": dict(self.generation_defaults),
                **asdict(self.counters)}

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> EngineStatus:
        """The one parser of a status document (`to_json`'s shape). ValueError when it is malformed."""

        def part(kind: type) -> dict[str, Any]:
            return {f.name: doc[f.name] for f in fields(kind) if f.name in doc}

        try:
            return TypeAdapter(cls).validate_python({**part(cls), "weights": part(WeightsStatus),
                                                     "counters": part(EngineCounters)})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"][1:] or first["loc"])
            raise ValueError(f"engine status is malformed: {where}: {first['msg']}") from None
