"""Pure decisions about rounds: is the next one due, which attempt, how long to back off, and what
the status says afterwards. No I/O, no clock: `now` is an argument.

Progress lives in the LearnerRun's status, so these functions read and write status fields:

    round         the round running now, or the last one run (0: none yet)
    activeJob     the running round's Job, or null
    failures      consecutive failed attempts of `round` (0 once it succeeds)
    nextRoundAt   no Job starts before this time: the interval after a round, the backoff after a failure
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from ..policy import Decision, Outcome
from ..spec import LearnerRunSpec
from .results import RoundResult


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Progress:
    round: int = 0
    active_job: str | None = None
    failures: int = 0
    next_round_at: datetime | None = None
    serving: str | None = None

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> "Progress":
        return cls(round=int(status.get("round") or 0), active_job=status.get("activeJob") or None,
                   failures=int(status.get("failures") or 0),
                   next_round_at=parse_time(status.get("nextRoundAt")),
                   serving=status.get("servingCheckpoint") or None)


@dataclass(frozen=True)
class Start:
    """Create the Job for this round and attempt now."""
    round: int
    attempt: int


@dataclass(frozen=True)
class Wait:
    """No Job now: the phase to show, a CamelCase reason and a sentence."""
    phase: str
    reason: str
    message: str


def next_round(spec: LearnerRunSpec, progress: Progress, now: datetime) -> Start | Wait:
    """Whether to start a round when none is active: not suspended, the interval (or the retry
    backoff) has elapsed, and `maxRounds` is not reached. A failed round is retried, not skipped."""
    if progress.active_job:
        raise ValueError("a round is active")
    due = progress.next_round_at is None or now >= progress.next_round_at
    when = iso(progress.next_round_at) if progress.next_round_at else ""
    if spec.suspend:
        return Wait("Suspended", "Suspended", "suspended: no new rounds; serving continues")
    if progress.failures:
        if due:
            return Start(progress.round, progress.failures + 1)
        return Wait("Retrying", "BackingOff",
                    f"round {progress.round} failed {progress.failures}x; retrying at {when}")
    upcoming = progress.round + 1
    limit = spec.schedule.max_rounds
    if limit is not None and upcoming > limit:
        return Wait("Serving", "MaxRoundsReached", f"all {limit} rounds done; serving continues")
    if not due:
        return Wait("Serving" if progress.round else "Pending", "Waiting", f"round {upcoming} starts at {when}")
    return Start(upcoming, 1)


def backoff_seconds(failures: int, *, base: float, cap: float) -> float:
    """Exponential: base, 2*base, 4*base, ... capped. `failures` counts the failed attempts so far."""
    return min(cap, base * 2 ** max(0, failures - 1))


# -- status after a round --------------------------------------------------------------------------
# A round's `result` in the status history, and the Event it raises, by the gate's outcome.
HISTORY_RESULT = {Outcome.PROMOTE: "promoted", Outcome.PIN: "pinned", Outcome.KEEP: "pinned",
                  Outcome.REJECT: "rejected"}
EVENT_REASON = {"promoted": "Promoted", "rejected": "NotPromoted", "pinned": "NotPromoted", "empty": "EmptyRound"}

def history_entry(*, round_: int, attempt: int, job: str, now: datetime, result: RoundResult | None,
                  decision: Decision | None, failure: str | None = None) -> dict[str, Any]:
    """One history row. `result` is None for a failed Job (then `failure` says why)."""
    entry: dict[str, Any] = {"round": round_, "attempt": attempt, "job": job, "finishedAt": iso(now)}
    if result is None or result.status == "failed":
        return entry | {"result": "failed", "promoted": False,
                        "reason": failure or (result.reason if result else None) or "the trainer failed"}
    if result.status == "empty":
        return entry | {"result": "empty", "promoted": False, "reason": result.reason or "no new articles"}
    assert decision is not None and result.metrics is not None
    m = result.metrics
    general = m.ppl_pair("general")
    learned = m.knowledge.learned if m.knowledge and m.knowledge.learned else None
    chat = {"knowledgeBefore": learned.before if learned else None, "knowledgeAfter": learned.after if learned else None,
            "chatRetention": m.chat.retention if m.chat else None,
            "formatHealth": m.chat.format_ok.after if m.chat and m.chat.format_ok else None}
    return entry | {"result": HISTORY_RESULT[decision.outcome], "promoted": decision.promote,
                    "checkpoint": result.checkpoint, "trainLoss": m.train_loss, "perplexityBefore": general.before,
                    "perplexityAfter": general.after, **{k: v for k, v in chat.items() if v is not None},
                    "reason": decision.reason}


def append_history(history: list[Mapping[str, Any]] | None, entry: Mapping[str, Any], limit: int) -> list[dict]:
    """Newest last; at most `limit` rows (status must stay small)."""
    return [dict(h) for h in (history or [])][-(limit - 1):] + [dict(entry)] if limit > 1 else [dict(entry)]


def after_round(*, spec: LearnerRunSpec, now: datetime, result: RoundResult, serving: str | None) -> dict[str, Any]:
    """Status fields once a round's Job succeeded (published or empty)."""
    fields: dict[str, Any] = {"activeJob": None, "failures": 0, "servingCheckpoint": serving,
                              "nextRoundAt": iso(now + timedelta(seconds=spec.schedule.interval_seconds))}
    general = result.metrics.ppl_pair("general") if result.metrics else None
    if result.status == "published" and general and general.after is not None:
        fields["lastPerplexity"] = general.after
    return fields


def after_failure(*, progress: Progress, now: datetime, base: float, cap: float) -> dict[str, Any]:
    failures = progress.failures + 1
    delay = backoff_seconds(failures, base=base, cap=cap)
    return {"activeJob": None, "failures": failures, "nextRoundAt": iso(now + timedelta(seconds=delay))}


def set_condition(conditions: list[Mapping[str, Any]] | None, *, type_: str, status: bool, reason: str,
                  message: str, now: datetime, generation: int | None) -> list[dict[str, Any]]:
    """Upsert a condition; lastTransitionTime moves only when its status flips."""
    value = "True" if status else "False"
    out, found = [], False
    for c in conditions or []:
        c = dict(c)
        if c.get("type") == type_:
            found = True
            since = c.get("lastTransitionTime") if c.get("status") == value else iso(now)
            c = {"type": type_, "status": value, "reason": reason, "message": message,
                 "lastTransitionTime": since or iso(now)}
            if generation is not None:
                c["observedGeneration"] = generation
        out.append(c)
    if not found:
        c = {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": iso(now)}
        if generation is not None:
            c["observedGeneration"] = generation
        out.append(c)
    return out


def condition(conditions: list[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
