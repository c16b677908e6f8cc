"""What every phase of a round works with, built once per round: `RoundContext` (the run, the
round, the store, the parent, the inputs, the weights being trained and how they run),
`Prepared` (what the round built from its inputs before training), and `Phases` (the round's
phases as they start, told to its progress listener, and where its time went).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..checkpoints import CheckpointRef, CheckpointStore
from ..contracts import PhaseStarted, ProgressEvent
from ..memory import Memory
from ..spec import FeedbackSource, LearnerRunSpec, RunConfig, TrainingSpec
from . import knowledge, preference
from .data import Block
from .inputs import RoundInputs
from .loop import MasterWeights

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Listener = Callable[[ProgressEvent], None]


def _nobody(event: ProgressEvent) -> None:
    """The listener of a round nobody watches."""


class Phases:
    """The round's phases as they start (each told to `on_step` as a `PhaseStarted`), and the
    seconds each took (the round's `phase_seconds`)."""

    def __init__(self, on_step: Listener | None = None) -> None:
        self.on_step: Listener = on_step or _nobody
        self.marks: list[tuple[str, float]] = []
        self("loading")

    def __call__(self, name: str) -> None:
        self.marks.append((name, time.monotonic()))
        self.on_step(PhaseStarted(name))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far."""
        ends = [t for _, t in self.marks[1:]] + [time.monotonic()]
        return {name: round(end - t, 1) for (name, t), end in zip(self.marks, ends)}


@dataclass(frozen=True)
class RoundContext:
    """One round's fixed facts and the weights it trains (the model object is trained in place;
    which model, tokenizer and precision a round uses never changes within it)."""

    config: RunConfig
    round: int
    store: CheckpointStore
    parent: CheckpointRef | None  # None: the base model
    inputs: RoundInputs
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    precision: str  # resolved: bf16 | fp16 | fp32
    master: MasterWeights | None  # CPU bf16: the fp32 weights the optimizer updates
    phases: Phases
    started_at: float  # wall clock (time.time()) when the round started
    parent_memory: Memory | None = None  # the parent checkpoint's memory (None: it has none, or the base model)

    @property
    def spec(self) -> LearnerRunSpec:
        return self.config.spec

    @property
    def run(self) -> str:
        return self.config.name

    @property
    def training(self) -> TrainingSpec:
        return self.config.spec.training

    @property
    def feedback_spec(self) -> FeedbackSource:
        """How the run learns its users' feedback; only a run with a feedback source has any to learn."""
        fs = self.config.spec.feedback
        if fs is None:
            raise ValueError(f"run {self.run!r} has no feedback source")
        return fs

    @property
    def on_step(self) -> Listener:
        """Where the training loops tell each step (the round's progress listener)."""
        return self.phases.on_step

    @property
    def eos(self) -> int:
        eos = self.tokenizer.eos_token_id
        if not isinstance(eos, int):
            raise ValueError(f"the tokenizer of {self.spec.base_model} has no end-of-sequence token")
        return eos


@dataclass(frozen=True)
class Prepared:
    """Everything tokenised and built before the parent is measured."""

    train_docs: list[list[int]]
    replay_docs: list[list[int]]
    train_batches: list[Block]
    chat: knowledge.ChatData | None
    too_long: int
    sets: dict[str, list[Block]]  # fresh | trained | general evaluation batches
    refs: knowledge.ChatReferences | None  # the chat references (retention set, chat replay)
    probes: knowledge.ProbeSets | None
    fb_data: preference.FeedbackData | None
    memory: Memory | None  # the candidate's: its parent's and this round's articles (None: training.memory off)
