"""What crosses a process or component boundary, defined once.

- **The round result**: the one JSON line `selflearn train` prints and writes to the termination
  message file, which the operator parses and local mode reads from the trainer's stdout:

      {"status": "published", "round": 7, "checkpoint": "s3://b/p/run/r000007", "id": "run/r000007",
       "parent": "s3://b/p/run/r000006", "metrics": {"train_loss": 2.1, "ppl": {...}, ...}}
      {"status": "empty", "round": 7, "reason": "no new articles"}
      {"status": "failed", "round": 7, "reason": "training.maxLength 4096 exceeds ..."}

- **Checkpoint ids**: a round's directory `r000007`, its short id `<run>/r000007` (the
  `X-Selflearn-Checkpoint` header, the dashboard, the manifest), and `base:<model>` for the
  untrained base model.
- **Engine events**: what one generation streams from the engine to the HTTP layer (possibly
  through Ray): one `Start`, `Token`s, then `Done` or `Error`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Union

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
    metrics: dict[str, Any] | None = None
    reason: str | None = None  # why a round is empty or failed
    id: str | None = None  # the checkpoint's short id, <run>/r000007
    parent: str | None = None  # the URI it was trained from; None: the base model

    def __post_init__(self) -> None:
        if self.status not in ROUND_STATUSES:
            raise ResultError(f"unknown result status {self.status!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

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
                       metrics=doc["metrics"])
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

    # The figures the operator's status and the gate read.
    @property
    def general_ppl(self) -> tuple[float | None, float | None]:
        g = ((self.metrics or {}).get("ppl") or {}).get("general") or {}
        return g.get("before"), g.get("after")

    @property
    def knowledge_learned(self) -> tuple[float | None, float | None]:
        k = ((self.metrics or {}).get("knowledge") or {}).get("learned") or {}
        return k.get("before"), k.get("after")

    @property
    def chat(self) -> dict[str, Any]:
        return (self.metrics or {}).get("chat") or {}

    @property
    def train_loss(self) -> float | None:
        return (self.metrics or {}).get("train_loss")


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


EngineEvent = Union[Start, Token, Done, Error]
END_EVENTS = (Done, Error)

