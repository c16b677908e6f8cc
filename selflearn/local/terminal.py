"""What `selflearn local` prints while it learns: a line when a round starts, the running round's
progress from the trainer's progress file, and the round's outcome when it is decided.

The progress is shown by the trainer's own `RoundDisplay` (`selflearn/trainer/progress.py`), fed
each `RoundProgress` the driver reads, so that `selflearn train` and `selflearn local` show a round
alike: each phase's line as it starts, then on a terminal a bar (steps done of total, loss,
tokens/s, ETA) redrawn in place, elsewhere (a log file, a pipe) a plain line every tenth of the steps.
"""

from __future__ import annotations

from typing import TextIO

from ..contracts import checkpoint_id_of_uri
from ..trainer.progress import RoundDisplay
from .events import LocalEvent, RoundProgressed, RoundRecorded, RoundStarted
from .records import RoundRecord
from .status import clean


def started_line(event: RoundStarted) -> str:
    source = checkpoint_id_of_uri(event.parent) if event.parent else "the base model"
    return f"round {event.round}: training from {source}"


def outcome_line(rec: RoundRecord) -> str:
    """`round 3: promoted: ...`, `round 3: rejected: ...`, `round 3: no new articles`: the reason
    for people, which names the outcome."""
    return f"round {rec.round}: {clean(rec.reason or rec.status, 1000)}"


class Terminal:
    """The listener `selflearn local` prints with, on `out` (a bar when `out` is a TTY)."""

    def __init__(self, out: TextIO):
        self.out = out
        self._display: RoundDisplay | None = None  # the running round's

    def __call__(self, event: LocalEvent) -> None:
        match event:
            case RoundStarted():
                self._end_round()
                self._line(started_line(event))
                self._display = RoundDisplay(self.out)
            case RoundProgressed(progress=progress):
                if self._display is None:
                    self._display = RoundDisplay(self.out)
                self._display.show(progress)
            case RoundRecorded(record=rec):
                self._end_round()
                self._line(outcome_line(rec))

    def _end_round(self) -> None:
        display, self._display = self._display, None
        if display is not None:
            display.close()

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
