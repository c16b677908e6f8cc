"""The chat engine: continuous batching over a KV cache, streaming, and hot-swapped weights.

One scheduler thread owns the model. Each loop it admits waiting requests (one batched prefill of
the newcomers, merged into the running batch), then runs one decode step for every running row,
so sixteen users share each forward pass instead of queueing behind each other, and a newcomer
waits at most one step to start. Rows leave the batch as soon as they finish.

Hot swap (swap.py: `HotSwap`, which the engine is): `configure(user_config)` loads new weights
on a loader thread while the old ones keep answering; installing them is a single assignment under
the lock. Running rows stay in the batch of the weights they started on (a batch is bound to one
`LoadedModel`), so in-flight requests finish on their own weights and new ones start on the new
weights. A failed load leaves the old weights in place and is reported by `status()`.

Two engines decode under this one scheduler (`user_config.engine`): the torch engine above
(`Batch`, serving/batch.py), and OpenVINO GenAI's continuous-batching pipeline (`OpenVinoBatch`,
serving/openvino_engine.py), which takes the admitted prompts and does its own batching and paged
KV cache; a loaded model is one or the other, and both feed the same `Ticket`s.

The engine knows nothing about Ray or HTTP: tests and benchmarks construct it directly.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Callable

from ..contracts import BatchStatus, EngineCounters, EngineRequest, EngineStatus
from ..machine import available_cpus
from . import loader as loader_mod
from .batch import Batch, Sink, Ticket
from .config import EngineOptions
from .openvino_engine import OpenVinoBatch
from .sampling import SamplingParams
from .swap import HotSwap

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its cap; callers answer 503."""


class NotReady(RuntimeError):
    """No weights are loaded yet."""


def context_error(prompt_tokens: int, new_tokens: int, context: int) -> str:
    """The message of a prompt that cannot fit, naming the context in effect: the model's own,
    capped by `max_context_tokens`."""
    return (f"the prompt is {prompt_tokens} tokens and {new_tokens} new tokens were asked for: more than "
            f"the {context}-token context; shorten the message or ask for fewer new tokens")


class Engine(HotSwap):
    """Continuous-batching generator with hot-swappable weights. Thread-safe public methods."""

    def __init__(self, options: EngineOptions | None = None, load: loader_mod.Load = loader_mod.load):
        self.options = options or EngineOptions()
        self._cv = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._batches: list[Batch | OpenVinoBatch] = []
        self.counters = EngineCounters()
        self._init_weights(load)
        self._stop = False
        self._heartbeat = time.monotonic()
        import torch

        # Ray gives actors without CPUs OMP_NUM_THREADS=1; the model replica wants the machine's cores.
        torch.set_num_threads(self.options.torch_threads or available_cpus())
        self._thread = threading.Thread(target=self._run, name="selflearn-engine", daemon=True)
        self._thread.start()

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: EngineRequest, sink: Sink) -> Ticket:
        """Queue a request; its events (`Start`, `Token`s, then `Done` or `Error`) arrive at `sink`,
        from the scheduler thread. Parameters it leaves out take the user_config's `generation`
        defaults. Raises QueueFull or NotReady."""
        params = SamplingParams.resolve(request.params, self.defaults, self.options.max_new_tokens_cap)
        ticket = Ticket(list(request.messages), params, sink)
        ticket.wake = self._wake
        use = self.memory_use
        ticket.memory = use if (use.enabled if request.params.memory is None else request.params.memory) else None
        with self._cv:
            if self.current is None:
                raise NotReady("no model is loaded: its weights failed to load (see /readyz)" if self._failure
                               else "the model is still loading")
            if params.seed is not None and params.temperature > 0 and self.current.model is not None:
                import torch

                ticket.generator = torch.Generator(device=self.current.model.device).manual_seed(params.seed)
            if len(self._waiting) >= self.options.max_queue:
                raise QueueFull(f"the queue is full ({self.options.max_queue} waiting)")
            self._waiting.append(ticket)
            self.counters.requests += 1
            self._cv.notify_all()
        return ticket

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- scheduler -------------------------------------------------------------------------------
    def _running_rows(self) -> int:
        return sum(len(b.rows) for b in self._batches)

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not self._batches:
                        self._heartbeat = time.monotonic()
                        self._cv.wait(timeout=1.0)
                    if self._stop:
                        break
                    free = self.options.max_batch_size - self._running_rows()
                    admit: list[Ticket] = []
                    while self._waiting and len(admit) < free:
                        t = self._waiting.popleft()
                        if t.cancelled:
                            t.finish("cancelled")
                        else:
                            admit.append(t)
                    lm = self.current
                self._heartbeat = time.monotonic()
                if admit:
                    self._guarded(admit, lambda: self._prefill(admit, lm))
                for batch in list(self._batches):
                    self._guarded(batch.rows, lambda: self._step(batch))
                self._batches = [b for b in self._batches if b.rows]
        for b in self._batches:
            for row in b.rows:
                row.fail(503, "the engine is shutting down")

    def _guarded(self, rows: list[Ticket], fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as err:  # one bad step fails its rows, never the scheduler
            log.exception("generation step failed")
            self.counters.step_errors += 1
            self.counters.last_error = f"generation failed: {type(err).__name__}: {err}"
            self.counters.last_error_at = time.time()
            ids = {id(r) for r in rows}
            for b in self._batches:
                if any(id(r) in ids for r in b.rows):
                    if isinstance(b, OpenVinoBatch):
                        b.abandon()
                    b.rows = []
            for r in rows:
                if not r.done:
                    r.fail(500, "generation failed; see the server log")

    def _encode(self, tickets: list[Ticket], lm: loader_mod.LoadedModel) -> tuple[list[Ticket], list[list[int]]]:
        """The prompt ids of each ticket that fits the context (`Start` sent); the others fail."""
        context = min(lm.context_length, self.options.max_context_tokens)
        rows, prompts = [], []
        for t in tickets:
            try:
                ids, dropped = lm.encode(t.recall(lm), context - t.params.max_new_tokens)
            except loader_mod.PromptTooLong as err:
                t.fail(422, context_error(err.prompt_tokens, t.params.max_new_tokens, context),
                       code="context_length_exceeded", param="messages")
                continue
            t.start(lm, len(ids), dropped)
            rows.append(t)
            prompts.append(ids)
        return rows, prompts

    def _prefill(self, tickets: list[Ticket], lm: loader_mod.LoadedModel | None) -> None:
        import torch

        from .decode import HeadroomCache

        if lm is None:  # not reached: `submit` queues nothing before weights load, and they never unload
            for t in tickets:
                t.fail(503, "no model is loaded")
            return
        rows, prompts = self._encode(tickets, lm)
        if not rows:
            return
        self.counters.prompt_tokens += sum(len(p) for p in prompts)
        if lm.pipeline is not None:
            return self._admit_openvino(rows, prompts, lm)
        dev = lm.model.device
        width = max(len(p) for p in prompts)
        pad = lm.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = HeadroomCache()
        out = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{lm.cache_kw: cache})
        vocab = out.logits.shape[-1]
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=dev).clamp(max=vocab - 1)] = True
        group = Batch(lm, rows, cache, mask, mask.sum(1), seen)
        group.sample_and_push(out.logits[:, -1])
        self.counters.generated_tokens += len(rows)
        group.keep([i for i, r in enumerate(group.rows) if not r.done])
        if not group.rows:
            return
        home = next((b for b in self._batches if isinstance(b, Batch) and b.lm is lm and b.rows), None)
        if home is None:
            self._batches.append(group)
        else:
            home.merge(group)

    def _admit_openvino(self, rows: list[Ticket], prompts: list[list[int]], lm: loader_mod.LoadedModel) -> None:
        home = next((b for b in self._batches if isinstance(b, OpenVinoBatch) and b.lm is lm), None)
        if home is None:
            home = OpenVinoBatch(lm)
            self._batches.append(home)
        for row, ids in zip(rows, prompts):
            home.add(row, ids)

    def _step(self, batch: Batch | OpenVinoBatch) -> None:
        import torch

        if isinstance(batch, OpenVinoBatch):
            self.counters.generated_tokens += batch.step()
            return

        for r in batch.rows:
            if r.cancelled and not r.done:
                r.finish("cancelled")
        batch.keep([i for i, r in enumerate(batch.rows) if not r.done])
        if not batch.rows:
            return
        lm = batch.lm
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
        out = lm.model(input_ids=batch.last[:, None], attention_mask=batch.mask,
                       position_ids=batch.next_pos[:, None], use_cache=True, **{lm.cache_kw: batch.cache})
        batch.next_pos = batch.next_pos + 1
        batch.sample_and_push(out.logits[:, -1])
        self.counters.generated_tokens += len(batch.rows)
        batch.keep([i for i, r in enumerate(batch.rows) if not r.done])

    # -- introspection ---------------------------------------------------------------------------
    def status(self) -> EngineStatus:
        batches = list(self._batches)
        return EngineStatus(weights=self.weights_status(), queue_depth=len(self._waiting),
                            running=sum(len(b.rows) for b in batches),
                            batches=tuple(BatchStatus(b.lm.checkpoint_id, len(b.rows)) for b in batches),
                            generation_defaults=self.defaults.model_dump(),
                            counters=dataclasses.replace(self.counters))

    def check_health(self, stall_seconds: float = 120.0) -> None:
        """Raise if a restart would mend the replica: a dead scheduler, a stuck step (or no weights
        and none asked for). Weights that failed to load are not such a case (see `_weights_fault`):
        that replica stays up and unready (/readyz 503, degraded with the reason), retries the load
        with backoff, and takes the next user_config in place."""
        if not self._thread.is_alive():
            raise RuntimeError("the scheduler thread died")
        if (fault := self._weights_fault()) is not None:
            raise RuntimeError(fault)
        busy = bool(self._waiting) or bool(self._batches)
        if busy and time.monotonic() - self._heartbeat > stall_seconds:
            raise RuntimeError(f"the scheduler made no progress for {stall_seconds:.0f}s")

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cv.notify_all()
        for t in waiting:
            t.fail(503, "the engine is shutting down")
        self._thread.join(timeout=30)
