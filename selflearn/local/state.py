"""Local mode's state and its decisions: pure functions over `LocalState` (no I/O, no Ray, no model).

The state is a frozen pydantic model: the run, the round counter, the promoted and the serving
checkpoint, the phase, the running round with the trainer's live progress, and one
`RoundRecord` per finished round. Every function here returns a new state; nothing edits one.
`state_file` writes it as JSON, which the dashboard and `selflearn status` read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, computed_field

from ..contracts import RoundProgress, RoundResult, base_id, checkpoint_id_of_uri
from ..policy import Decision, decide, promoted_after, switch_to
from ..spec import LearnerRunSpec, PromotionSpec, RunConfig
from .records import MAX_LOSS_POINTS, LossCurve, RoundManifest, RoundRecord

STATE_VERSION = 1

# What the driver is doing; the dashboard and `selflearn status` show it as it is.
Phase = Literal["starting", "training", "evaluating", "swapping", "serving", "stopped"]


class RunningRound(BaseModel):
    """The round being trained now, with the trainer's progress and its live loss curve."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    round: int
    started_at: float
    parent: str | None = None  # the checkpoint it trains from; None: the base model
    trainer_pid: int | None = None
    progress: RoundProgress | None = None  # the trainer's progress file, as last read
    losses: LossCurve = ()  # one point per step seen
    loss_step: int | None = None  # the step of the last point


class LocalState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = STATE_VERSION
    run: str
    base_model: str
    store: str  # the store's URI: a state file belongs to one run on one store
    round: int = 0  # the last round that published or came out empty
    promoted: str | None = None  # the promoted checkpoint's URI; None: the base model
    serving: str | None = None  # what the replica serves; None: the base model
    served_at: float | None = None
    phase: Phase = "starting"
    current_round: RunningRound | None = None
    rounds: tuple[RoundRecord, ...] = ()
    updated_at: float | None = None

    # The ids people read are derived from the URIs, never stored beside them.
    @computed_field  # type: ignore[prop-decorator]
    @property
    def promoted_id(self) -> str | None:
        return checkpoint_id_of_uri(self.promoted) if self.promoted else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def serving_id(self) -> str:
        """What the replica answers with (`X-Model-Checkpoint`): the checkpoint's id or `base:<model>`."""
        return checkpoint_id_of_uri(self.serving) if self.serving else base_id(self.base_model)


def new_state(config: RunConfig) -> LocalState:
    return LocalState(run=config.name, base_model=config.spec.base_model, store=config.spec.storage.uri,
                      updated_at=time.time())


@dataclass(frozen=True)
class Action:
    """What the driver must do after a round: move the store's promoted pointer and serving, each
    only where the decision moves it (`policy.promoted_after`, `policy.switch_to`)."""

    serve: str | None  # move serving to this checkpoint (None: stay)
    point_to: str | None  # move the store's promoted pointer to this checkpoint (None: leave it)
    decision: Decision | None


def decide_round(state: LocalState, result: RoundResult, spec: LearnerRunSpec) -> Decision | None:
    if result.status != "published":
        return None
    return decide(spec, result.metrics, candidate=result.checkpoint, serving=state.serving)


def apply_result(state: LocalState, result: RoundResult, manifest: RoundManifest | None, spec: LearnerRunSpec,
                 *, now: float | None = None) -> tuple[LocalState, Action]:
    """Given a round's result and its manifest: the new state and the action.

    A published or empty round advances the round counter; a failed one does not (it is retried
    under the same number, and its record is superseded by the retry's). Only a promoted
    checkpoint, or a pin, changes what serves.
    """
    decision = decide_round(state, result, spec)
    rec = RoundRecord.of(result, manifest, decision, now=time.time() if now is None else now)
    rounds = tuple(r for r in state.rounds if not (r.round == rec.round and r.status == "failed")) + (rec,)
    counted = rec.status in ("published", "empty")
    stands_on = promoted_after(decision)
    new = state.model_copy(update={
        "rounds": rounds, "current_round": None, "round": max(state.round, rec.round) if counted else state.round,
        "promoted": stands_on or state.promoted})
    return new, Action(serve=switch_to(decision, state.serving), point_to=stands_on, decision=decision)


def prepared(state: LocalState, *, promoted: str | None, base_model: str) -> LocalState:
    """The state at start-up, once reconciled with the store: nothing running, `promoted` to serve."""
    return state.model_copy(update={"promoted": promoted, "base_model": base_model, "current_round": None,
                                    "phase": "serving"})


def round_started(state: LocalState, round_: int, *, now: float) -> LocalState:
    """Round `round_` trains from the promoted checkpoint."""
    running = RunningRound(round=round_, started_at=now, parent=state.promoted)
    return state.model_copy(update={"phase": "training", "current_round": running})


def trainer_started(state: LocalState, pid: int | None) -> LocalState:
    """The running round's trainer process (None: it has exited)."""
    if state.current_round is None:
        return state
    return state.model_copy(update={"current_round": state.current_round.model_copy(update={"trainer_pid": pid})})


def progressed(state: LocalState, progress: RoundProgress) -> LocalState:
    """The trainer's newest progress in the running round, and each new step's loss on its live
    loss curve (every other point dropped when it grows too long)."""
    cur = state.current_round
    if cur is None:
        return state
    losses, loss_step = cur.losses, cur.loss_step
    if progress.step and progress.step != cur.loss_step and progress.loss is not None and \
            math.isfinite(progress.loss):
        losses, loss_step = losses + (progress.loss,), progress.step
        if len(losses) > MAX_LOSS_POINTS:
            losses = losses[1::2]
    running = cur.model_copy(update={"progress": progress, "losses": losses, "loss_step": loss_step})
    return state.model_copy(update={"current_round": running})


def in_phase(state: LocalState, phase: Phase) -> LocalState:
    return state.model_copy(update={"phase": phase})


def served(state: LocalState, uri: str | None, *, now: float) -> LocalState:
    """Serving answers with `uri` (None: the base model) since `now`."""
    return state.model_copy(update={"serving": uri, "served_at": now})


def timed_publish_to_serve(state: LocalState) -> LocalState:
    """After a round's swap: how long its checkpoint took from publication to serving."""
    last = state.rounds[-1] if state.rounds else None
    if last is None or last.published_at is None or state.served_at is None or last.checkpoint != state.serving:
        return state
    rec = last.model_copy(update={"publish_to_serve_s": round(state.served_at - last.published_at, 2)})
    return state.model_copy(update={"rounds": state.rounds[:-1] + (rec,)})


def stopped(state: LocalState) -> LocalState:
    """Nothing runs: the interrupted round (if any) is retried on the next start."""
    return state.model_copy(update={"current_round": None, "phase": "stopped"})


def startup_serving(state: LocalState, promotion: PromotionSpec, store_promoted: str | None) -> str | None:
    """What to serve at start: a pin wins, then the store's pointer, then the state's; None: the base model."""
    return promotion.pinned_checkpoint or store_promoted or state.promoted


def next_round(state: LocalState, *, store_last_round: int = 0, latest_published: int = 0) -> int:
    """One past everything anyone has seen: the state, the trainer's cursor state and the store."""
    return max(state.round, store_last_round, latest_published) + 1
