"""What one generation streams from the engine to the HTTP layer, and the engine's request and
status (they cross Ray between the ingress and the model replica, so they pickle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Union

from pydantic import TypeAdapter, ValidationError

@dataclass(frozen=True)
class Source:
    """A passage of the checkpoint's memory the answer was given to read: the article it comes
    from and the checkpoint whose round learned it."""
    title: str
    url: str
    checkpoint: str


@dataclass(frozen=True)
class Start:
    """The request got a batch slot on `checkpoint`."""
    checkpoint: str
    prompt_tokens: int
    dropped_messages: int = 0  # oldest turns left out to fit the context
    queue_ms: float = 0.0
    sources: tuple[Source, ...] = ()  # what the memory put in front of the question


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
    sources: tuple[Source, ...] = ()  # what the memory put in front of the question


@dataclass(frozen=True)
class Error:
    status: int  # the HTTP status it maps to: 422 bad request, 503 busy or unavailable, 504 timeout
    message: str
    code: str | None = None  # the error body's `code`, e.g. context_length_exceeded
    param: str | None = None  # the request field it is about, in the engine request's terms (`messages`)


EngineEvent = Union[Start, Token, Done, Error]
END_EVENTS = (Done, Error)



@dataclass(frozen=True)
class Completion:
    """A whole answer: the `Start` event (None if the request never got a batch slot) and its end."""
    start: Start | None
    end: Done | Error


# -- the engine's request and status -----------------------------------------------------------------


# Both cross Ray between the ingress and the model replica (pickled), so they are frozen dataclasses
# of plain values. The engine builds the status; `/status` shows `EngineStatus.to_json()` as is.

Message = dict[str, str]  # {"role": system | developer | user | assistant, "content": ...}: the chat template's


@dataclass(frozen=True)
class RequestParams:
    """What one request asks of the sampler; None takes the deployment's default (`generation` in the
    ChatModel's user_config). `max_new_tokens` is capped by `engine.max_new_tokens_cap`."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    memory: bool | None = None  # read the checkpoint's memory (None: the deployment's `memory.enabled`)


@dataclass(frozen=True)
class EngineRequest:
    """One generation: the conversation so far, the newest user message last, and its parameters."""
    messages: tuple[Message, ...]
    params: RequestParams = field(default_factory=RequestParams)


@dataclass(frozen=True)
class WeightsStatus:
    """Which weights answer, which the user_config asks for, and why those differ (`degraded`)."""
    ready: bool = False  # weights are loaded: requests get answers
    checkpoint: str | None = None  # the id of what answers: <run>/r000007 or base:<model>
    checkpoint_uri: str | None = None
    base_model: str | None = None
    dtype: str | None = None
    engine: str | None = None  # what decodes: torch | openvino
    chat_template: bool | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    loading: str | None = None  # the id being loaded now
    desired: str | None = None  # the id asked for while it is not yet (or cannot be) the one serving
    degraded: bool = False  # what answers (if anything) is not what was asked for
    degraded_reason: str | None = None
    memory_passages: int | None = None  # passages in the serving checkpoint's memory; None: it has none


@dataclass
class EngineCounters:
    """One engine's running totals. Mutable: the engine adds to them; a status carries a copy."""
    requests: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    swaps: int = 0
    swap_failures: int = 0
    last_swap_error: str | None = None
    last_swap_error_at: float | None = None
    last_swap_seconds: float | None = None
    step_errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass(frozen=True)
class BatchStatus:
    checkpoint: str  # the weights its rows decode on
    rows: int


@dataclass(frozen=True)
class EngineStatus:
    """The model replica's status (`ChatModel.status`): its weights, its queue, its counters."""
    weights: WeightsStatus = field(default_factory=WeightsStatus)
    queue_depth: int = 0  # requests waiting for a batch slot
    running: int = 0  # requests decoding now
    batches: tuple[BatchStatus, ...] = ()
    generation_defaults: dict[str, int | float | list[str]] = field(default_factory=dict)
    counters: EngineCounters = field(default_factory=EngineCounters)

    @property
    def unready_reason(self) -> str | None:
        """Why no weights answer (None: they do), in the words of the failure that left none."""
        if self.weights.ready:
            return None
        return self.weights.degraded_reason or self.counters.last_swap_error or "no weights are loaded yet"

    def to_json(self) -> dict[str, Any]:
        """One flat document, `/status`'s `model`: the weights' fields, the queue's, the counters'."""
        return {**asdict(self.weights), "queue_depth": self.queue_depth, "running": self.running,
                "batches": [asdict(b) for b in self.batches], "generation_defaults": dict(self.generation_defaults),
                **asdict(self.counters)}

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> EngineStatus:
        """The one parser of a status document (`to_json`'s shape). ValueError when it is malformed."""

        def part(kind: type) -> dict[str, Any]:
            return {f.name: doc[f.name] for f in fields(kind) if f.name in doc}

        try:
            return TypeAdapter(cls).validate_python({**part(cls), "weights": part(WeightsStatus),
                                                     "counters": part(EngineCounters)})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"][1:] or first["loc"])
            raise ValueError(f"engine status is malformed: {where}: {first['msg']}") from None
