"""The running round on a terminal, from its typed progress events or from its progress file.

`RoundDisplay` is a listener of the trainer's events (`contracts.PhaseStarted`, `StepDone`) and
shows each `contracts.RoundProgress` it is given, so that `selflearn train` (events, in process)
and local mode (the documents of the trainer subprocess's `--progress-file`) show a round alike:

    on a terminal (the stream is a TTY)        elsewhere (a log file, a pipe)
    [0:03] loading                             [0:03] loading
    [0:09] evaluating the parent               [0:09] evaluating the parent
    [0:12] training                            [0:12] training
    training:  28%|██▊       | 5/18 [00:12,    [0:13] training: step 1/18 (6%), loss 2.512, 240 tok/s, ETA 0:55
      loss 2.345, 265 tok/s, ETA 0:52]         [0:16] training: step 2/18 (11%), loss 2.431, 262 tok/s, ETA 0:52
                                               ... one line every ~10% of the phase's steps

A phase's line as it starts; during a training phase (one with steps) a bar on a terminal, a
line every tenth of its steps elsewhere. The bar is tqdm's, and this is its only use.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, Sequence, TextIO

from ..contracts import ProgressEvent, RoundProgress

if TYPE_CHECKING:
    from tqdm import tqdm

Listener = Callable[[ProgressEvent], None]

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
PLAIN_LINES = 10  # a plain line every 1/PLAIN_LINES of a phase's steps


def fan_out(listeners: Sequence[Listener | None]) -> Listener | None:
    """One listener that hands each event to every given one in turn; None when none is given."""
    each = [f for f in listeners if f is not None]
    if not each:
        return None
    if len(each) == 1:
        return each[0]

    def to_all(event: ProgressEvent) -> None:
        for f in each:
            f(event)

    return to_all


def duration(seconds: float) -> str:
    """`52` -> `0:52`, `3725` -> `1:02:05`: the clock a person reads an elapsed time or an ETA on."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def stats_text(doc: RoundProgress) -> str:
    """The step's figures that are known: `loss 2.345, 265 tok/s, ETA 0:52`."""
    parts = []
    if doc.loss is not None:
        parts.append(f"loss {doc.loss:.3f}")
    if doc.tokens_per_s is not None:
        parts.append(f"{doc.tokens_per_s:.0f} tok/s")
    if doc.eta_s is not None:
        parts.append(f"ETA {duration(doc.eta_s)}")
    return ", ".join(parts)


def _since_start(doc: RoundProgress) -> str:
    if doc.started_at is None or doc.updated_at is None:
        return ""
    return f"[{duration(doc.updated_at - doc.started_at)}] "


def phase_line(doc: RoundProgress) -> str:
    """`[0:12] training`: the phase the round entered, and when since it started."""
    return f"{_since_start(doc)}{doc.phase}"


def step_line(doc: RoundProgress) -> str:
    """`[0:45] training: step 5/18 (28%), loss 2.345, 265 tok/s, ETA 0:52` (a document with a step)."""
    stats = stats_text(doc)
    share = f" ({100 * (doc.step or 0) // doc.of}%)" if doc.of else ""
    return f"{_since_start(doc)}{doc.phase}: step {doc.step}/{doc.of}{share}" + (f", {stats}" if stats else "")


class RoundDisplay:
    """Shows a running round on `stream` (stderr by default): a listener of its events, or fed the
    progress file's documents one by one (`show`); `close` when the round is over."""

    def __init__(self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._clock = clock
        self._doc = RoundProgress(started_at=clock())
        self._phase: str | None = None  # the phase whose line was shown
        self._step = 0  # the newest step shown of that phase
        self._tenth = -1  # plain: the tenth of the phase's steps whose line was shown
        self._bar: tqdm | None = None

    def __call__(self, event: ProgressEvent) -> None:
        self.show(self._doc.after(event, self._clock()))

    def show(self, doc: RoundProgress) -> None:
        """Show what is new in `doc` since the document shown before it."""
        self._doc = doc
        if doc.phase != self._phase:
            self.close()
            self._phase, self._step, self._tenth = doc.phase, 0, -1
            self._write(phase_line(doc))
        if doc.step is None or not doc.of or doc.step == self._step:
            return
        if doc.step < self._step:  # another pass of the same phase starts over
            self.close()
            self._tenth = -1
        self._step = doc.step
        if self.tty:
            self._advance_bar(doc)
        elif doc.step * PLAIN_LINES // doc.of > self._tenth:
            self._tenth = doc.step * PLAIN_LINES // doc.of
            self._write(step_line(doc))

    def close(self) -> None:
        """Finish the bar of the phase shown (it stays on the terminal, complete as it got)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _advance_bar(self, doc: RoundProgress) -> None:
        from tqdm import tqdm

        assert doc.step is not None and doc.of is not None
        if self._bar is None or self._bar.total != doc.of:
            self.close()
            # Redrawn at every step: a training step takes longer than a redraw by far.
            self._bar = tqdm(total=doc.of, desc=doc.phase, unit="step", file=self.stream, leave=True,
                             dynamic_ncols=True, bar_format=BAR_FORMAT, mininterval=0, miniters=1)
        self._bar.set_postfix_str(stats_text(doc), refresh=False)
        self._bar.update(doc.step - self._bar.n)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
