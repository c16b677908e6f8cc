"""A running round's progress: the trainer's typed events (`PhaseStarted`, `StepDone`) and the
progress file's document (`RoundProgress`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from pydantic import BaseModel, ConfigDict

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
