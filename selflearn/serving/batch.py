"""One request (`Ticket`) and the rows decoding together on one set of weights (`Batch`).

A batch's tensors are aligned with its rows: the KV cache (B, heads, T, head_dim) per layer, the
attention mask (B, T) with left padding, each row's next position id and the tokens it has seen.
Newcomers are prefilled as their own batch and merged in (the shorter side is left-padded);
finished rows are dropped and cache columns no row attends to any more are cut off.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from ..contracts import Done, EngineEvent, Error, Message, Source, Start, Token
from ..memory import reading_prompt
from ..spec import MemoryUseSpec
from . import loader as loader_mod
from .sampling import SamplingParams, repetition_penalty, sample

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Sink = Callable[[EngineEvent], None]
_ids = itertools.count(1)


class Ticket:
    """One request's life in the engine; events go to `sink` from the scheduler thread."""

    def __init__(self, messages: list[Message], params: SamplingParams, sink: Sink):
        self.id = next(_ids)
        self.messages = messages
        self.params = params
        self.sink = sink
        self.cancelled = False
        self.done = False
        self.created = time.monotonic()
        self.lm: loader_mod.LoadedModel | None = None
        self.prompt_len = 0
        self.out_ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.first_token_at: float | None = None
        self.wake: Callable[[], None] | None = None  # wakes the engine's scheduler, to see a cancel soon
        self.memory: MemoryUseSpec | None = None  # how it reads the memory of its weights (None: it does not)
        self.sources: tuple[Source, ...] = ()  # what the memory put in front of its question
        self.generator: torch.Generator | None = None  # when the request carries a seed

    def cancel(self) -> None:
        self.cancelled = True
        if self.wake is not None:
            self.wake()

    # -- called by the scheduler -----------------------------------------------------------------
    def _emit(self, ev: EngineEvent) -> None:
        try:
            self.sink(ev)
        except Exception:  # a consumer that went away must not take the scheduler down
            log.debug("sink of request %s failed", self.id, exc_info=True)

    def fail(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        self.done = True
        self._emit(Error(status, message, code=code, param=param))

    def start(self, lm: loader_mod.LoadedModel, prompt_len: int, dropped: int) -> None:
        self.lm, self.prompt_len = lm, prompt_len
        self._emit(Start(lm.checkpoint_id, prompt_len, dropped_messages=dropped,
                         queue_ms=round((time.monotonic() - self.created) * 1000, 1), sources=self.sources))

    def recall(self, lm: loader_mod.LoadedModel) -> list[Message]:
        """The messages to prompt `lm` with: with the passages of its memory that are about the
        newest user message put in front of it (the sources the answer names), else as asked."""
        last = self.messages[-1] if self.messages else None
        if self.memory is None or lm.memory is None or last is None or last.get("role") != "user":
            return self.messages
        hits = lm.memory.search(last["content"], k=self.memory.passages, threshold=self.memory.threshold)
        if not hits:
            return self.messages
        sources: dict[tuple[str, str], Source] = {}
        for h in hits:
            sources.setdefault((h.passage.title, h.passage.learned_in),
                               Source(h.passage.title, h.passage.url, h.passage.learned_in))
        self.sources = tuple(sources.values())
        read = reading_prompt(last["content"], [(h.passage.title, h.passage.text) for h in hits])
        return [*self.messages[:-1], {**last, "content": read}]

    def push(self, token: int) -> None:
        """Take one sampled token: extend the text, stream what is safe to show, finish if due."""
        assert self.lm is not None
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in self.lm.eos_ids:
            return self.finish("stop")
        self.out_ids.append(token)
        text = self.lm.tokenizer.decode(self.out_ids, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
        stops = self.params.stop + self.lm.default_stop
        if stops:
            longest = max(len(s) for s in stops)
            hits = [p for p in (text.find(s, max(0, self.sent - longest)) for s in stops) if p >= 0]
            if hits:
                self.text = text[:min(hits)]
                return self.finish("stop")
        self.text = text
        if len(self.out_ids) >= self.params.max_new_tokens:
            return self.finish("length")
        # Hold back a possible start of a stop sequence and half of a multi-byte character.
        safe = len(text.rstrip("\ufffd"))
        if stops:
            safe = min(safe, len(text) - (longest - 1))
        if safe > self.sent:
            self._emit(Token(text[self.sent:safe]))
            self.sent = safe

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        text = self.text.rstrip("\ufffd")
        if len(text) > self.sent:
            self._emit(Token(text[self.sent:]))
        now = time.monotonic()
        n = len(self.out_ids)
        self._emit(Done(reason, text, checkpoint=self.lm.checkpoint_id if self.lm else None,
                        usage={"prompt_tokens": self.prompt_len, "completion_tokens": n,
                               "total_tokens": self.prompt_len + n},
                        ttft_ms=round(((self.first_token_at or now) - self.created) * 1000, 1),
                        total_ms=round((now - self.created) * 1000, 1), sources=self.sources))


class Batch:
    """Rows decoding together on one set of weights; tensors are aligned with `rows`."""

    def __init__(self, lm: loader_mod.LoadedModel, rows: list[Ticket], cache: Any, mask: torch.Tensor,
                 next_pos: torch.Tensor, seen: torch.Tensor):
        import torch

        self.lm, self.rows, self.cache = lm, rows, cache  # cache: the model's KV cache (decode.HeadroomCache)
        self.mask = mask          # (B, T) 1 for real tokens, 0 for left padding; T == cache length
        self.next_pos = next_pos  # (B,) position id of the token fed next
        self.seen = seen          # (B, V) bool: tokens in prompt or output (repetition penalty)
        # (B,) token sampled last, fed at the next step (`sample_and_push` sets it after the prefill).
        self.last = torch.zeros(len(rows), dtype=torch.long, device=mask.device)
        self._params()

    def _params(self) -> None:
        import torch

        p = [r.params for r in self.rows]
        dev = self.mask.device
        self.temperature = torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev)
        self.top_k = torch.tensor([x.top_k for x in p], dtype=torch.long, device=dev)
        self.top_p = torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev)
        self.penalty = torch.tensor([x.repetition_penalty for x in p], dtype=torch.float32, device=dev)
        self.generators = [r.generator for r in self.rows]

    def sample_and_push(self, logits: torch.Tensor) -> None:
        import torch

        logits = repetition_penalty(logits.float(), self.seen, self.penalty)
        tokens = sample(logits, self.temperature, self.top_k, self.top_p, self.generators)
        self.seen[torch.arange(len(self.rows), device=tokens.device), tokens] = True
        self.last = tokens
        for row, tok in zip(self.rows, tokens.tolist()):
            row.push(tok)

    def merge(self, other: "Batch") -> None:
        import torch

        t_a, t_b = self.mask.shape[1], other.mask.shape[1]
        t = max(t_a, t_b)
        for la, lb in zip(self.cache.layers, other.cache.layers):
            la.keys = torch.cat([_pad_left(la.keys, t - t_a), _pad_left(lb.keys, t - t_b)], 0)
            la.values = torch.cat([_pad_left(la.values, t - t_a), _pad_left(lb.values, t - t_b)], 0)
        self.mask = torch.cat([_pad_left(self.mask, t - t_a), _pad_left(other.mask, t - t_b)], 0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.seen = torch.cat([self.seen, other.seen])
        self.last = torch.cat([self.last, other.last])
        self.rows = self.rows + other.rows
        self._params()

    def keep(self, idx: list[int]) -> None:
        """Keep only rows `idx`; then drop leading cache columns that no remaining row attends to."""
        import torch

        if len(idx) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in idx]
        if not idx:
            return
        sel = torch.tensor(idx, device=self.mask.device)
        mask = self.mask[sel]
        start = int(mask.any(0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys[sel, :, start:]
            layer.values = layer.values[sel, :, start:]
        self.mask = mask[:, start:]
        self.next_pos, self.seen, self.last = self.next_pos[sel], self.seen[sel], self.last[sel]
        self._params()


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pad a (B, T) mask or a (B, H, T, D) cache tensor with n zero positions."""
    import torch

    if n == 0:
        return t
    dim = 1 if t.dim() == 2 else 2
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim)
