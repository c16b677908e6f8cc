"""The round result: the one JSON line `selflearn train` prints and writes to the termination
message file, which the operator parses and local mode reads from the trainer's stdout."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .ids import checkpoint_id_of_uri
from .metrics import ResultError, RoundMetrics

TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "SELFLEARN_TERMINATION_LOG"  # set to write the result line elsewhere (tests, Docker)
TERMINATION_MESSAGE_LIMIT = 4096  # bytes Kubernetes keeps of a termination message
ROUND_STATUSES = ("published", "empty", "failed")


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
