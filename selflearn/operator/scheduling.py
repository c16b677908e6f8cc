"""Pure decisions about rounds: is the next one due, which attempt, how long to back off, and what
the status says afterwards. No I/O, no clock: `now` is an argument.

Progress lives in the LearnerRun's status (status.py: `Progress`, the fields these functions
decide from and return); a finished attempt becomes a `HistoryRow`, its result and Event reason
follow from the gate's `Outcome` here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal, Sequence, assert_never

from ..policy import Decision, Outcome
from ..spec import LearnerRunSpec
from .results import JobView, RoundResult
from .status import Condition, ConditionType, HistoryResult, HistoryRow, Phase, Progress, iso


@dataclass(frozen=True)
class Start:
    """Create the Job for this round and attempt now."""
    round: int
    attempt: int


@dataclass(frozen=True)
class Wait:
    """No Job now: the phase to show, a CamelCase reason and a sentence."""
    phase: Phase
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
def history_result(outcome: Outcome) -> HistoryResult:
    """A published round's `result` in the status history, by the gate's outcome."""
    match outcome:
        case Outcome.PROMOTE:
            return "promoted"
        case Outcome.PIN | Outcome.KEEP:  # KEEP after a round: pinned, and the pin serves already
            return "pinned"
        case Outcome.REJECT:
            return "rejected"
        case _:
            assert_never(outcome)


def event_reason(result: HistoryResult) -> str:
    """The reason of the Event a finished attempt raises (`kubectl get events`)."""
    match result:
        case "promoted":
            return "Promoted"
        case "rejected" | "pinned":
            return "NotPromoted"
        case "empty":
            return "EmptyRound"
        case "failed":
            return "RoundFailed"
        case _:
            assert_never(result)


def failed_row(*, round_: int, attempt: int, job: str, now: datetime, reason: str) -> HistoryRow:
    """The history row of an attempt whose Job failed, or whose result could not be read."""
    return HistoryRow(round=round_, attempt=attempt, job=job, result="failed", promoted=False, reason=reason,
                      finished_at=now)


def finished_row(*, job: JobView, now: datetime, result: RoundResult, decision: Decision | None) -> HistoryRow:
    """The history row of a round whose Job succeeded: empty, or published and decided by the gate."""
    if result.status == "empty":
        return HistoryRow(round=job.round, attempt=job.attempt, job=job.name, result="empty", promoted=False,
                          reason=result.reason or "no new articles", finished_at=now)
    if result.status != "published" or result.metrics is None or decision is None:
        raise ValueError(f"round {job.round}: a {result.status} result needs failed_row")
    m, chat = result.metrics, result.metrics.chat
    general = m.ppl_pair("general")
    learned = m.knowledge.learned if m.knowledge else None
    return HistoryRow(round=job.round, attempt=job.attempt, job=job.name, result=history_result(decision.outcome),
                      promoted=decision.promote, reason=decision.reason, finished_at=now,
                      checkpoint=result.checkpoint, train_loss=m.train_loss,
                      perplexity_before=general.before, perplexity_after=general.after,
                      knowledge_before=learned.before if learned else None,
                      knowledge_after=learned.after if learned else None,
                      chat_retention=chat.retention if chat else None,
                      format_health=chat.format_ok.after if chat and chat.format_ok else None)


def after_round(progress: Progress, *, spec: LearnerRunSpec, now: datetime, serving: str | None) -> Progress:
    """Progress once a round's Job succeeded (published or empty): the next round after the interval."""
    return replace(progress, active_job=None, failures=0, serving_checkpoint=serving,
                   next_round_at=now + timedelta(seconds=spec.schedule.interval_seconds))


def after_failure(progress: Progress, *, now: datetime, base: float, cap: float) -> Progress:
    """Progress once an attempt failed: the same round again, after the backoff."""
    failures = progress.failures + 1
    delay = backoff_seconds(failures, base=base, cap=cap)
    return replace(progress, active_job=None, failures=failures, next_round_at=now + timedelta(seconds=delay))


def set_condition(conditions: Sequence[Condition], *, type_: ConditionType, status: bool, reason: str,
                  message: str, now: datetime, generation: int | None) -> tuple[Condition, ...]:
    """Upsert a condition; lastTransitionTime moves only when its status flips."""
    value: Literal["True", "False"] = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old and old.status == value and old.last_transition_time else now
    new = Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=since,
                    observed_generation=generation)
    if old is None:
        return (*conditions, new)
    return tuple(new if c is old else c for c in conditions)
