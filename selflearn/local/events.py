"""What `LocalDriver` tells its listener (the terminal, a bench script) as rounds run: typed events,
one class each, so that a listener matches on them and a renamed field is a type error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from ..contracts import RoundProgress
from .records import RoundRecord


@dataclass(frozen=True)
class RoundStarted:
    round: int
    parent: str | None  # the checkpoint URI it trains from; None: the base model


@dataclass(frozen=True)
class RoundProgressed:
    progress: RoundProgress  # the running round's `--progress-file`, changed since the last event


@dataclass(frozen=True)
class RoundRecorded:
    record: RoundRecord  # the round ended and was decided: its record as the state file keeps it


LocalEvent = Union[RoundStarted, RoundProgressed, RoundRecorded]
Listener = Callable[[LocalEvent], None]


def ignore(event: LocalEvent) -> None:
    """The listener of a driver nobody listens to."""
