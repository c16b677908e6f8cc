"""The chat engine: continuous batching over a KV cache, streaming, and hot-swapped weights.

One scheduler thread owns the model. Each loop it admits waiting requests (one batched prefill of
the newcomers, merged into the running batch), then runs one decode step for every running row,
so sixteen users share each forward pass instead of queueing behind each other, and a newcomer
waits at most one step to start. Rows leave the batch as soon as they finish.

Hot swap: `configure(user_config)` loads new weights on a loader thread while the old ones keep
answering; installing them is a single assignment under the lock. Running rows stay in the batch
of the weights they started on (a batch is bound to one `LoadedModel`), so in-flight requests
finish on their own weights and new ones start on the new weights. A failed load leaves the old
weights in place and is reported by `status()`.

The engine knows nothing about Ray or HTTP: tests and benchmarks construct it directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

from ..contracts import END_EVENTS, Done, EngineEvent, Error, base_id
from . import loader as loader_mod
from .batch import Batch, Sink, Ticket
from .config import EngineOptions, GenerationDefaults, ModelConfig, parse_model_config
from .sampling import SamplingParams

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its cap; callers answer 503."""


class NotReady(RuntimeError):
    """No weights are loaded yet."""


def available_cpus() -> int:
    """CPUs this process may use: affinity, capped by a cgroup v2 quota (containers)."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


class Engine:
    """Continuous-batching generator with hot-swappable weights. Thread-safe public methods."""

    def __init__(self, options: EngineOptions | None = None, load: Callable = loader_mod.load):
        self.options = options or EngineOptions()
        self._load = load
        self._cv = threading.Condition()
        self._swap_lock = threading.Lock()
        self._waiting: deque[Ticket] = deque()
        self._batches: list[Batch] = []
        self.current: loader_mod.LoadedModel | None = None
        self._config: ModelConfig | None = None
        self._desired: ModelConfig | None = None
        self.defaults = GenerationDefaults()
        self._loading: str | None = None
        self._loader_thread: threading.Thread | None = None
        self._stop = False
        self._heartbeat = time.monotonic()
        self.stats: dict[str, Any] = {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0, "swaps": 0,
                                      "swap_failures": 0, "last_swap_error": None, "last_swap_error_at": None,
                                      "last_swap_seconds": None, "step_errors": 0, "last_error": None,
                                      "last_error_at": None}
        import torch

        # Ray gives actors without CPUs OMP_NUM_THREADS=1; the model replica wants the machine's cores.
        torch.set_num_threads(self.options.torch_threads or available_cpus())
        self._thread = threading.Thread(target=self._run, name="selflearn-engine", daemon=True)
        self._thread.start()

    # -- weights ---------------------------------------------------------------------------------
    def configure(self, user_config: Any, *, wait: bool = False) -> bool:
        """Adopt a user_config. Never raises for a bad config or a failed load: the old weights stay.

        With wait=True the load runs in this thread (first load of a replica); otherwise on a
        loader thread while the current weights keep answering. Returns False if the config was
        rejected outright.
        """
        try:
            cfg = parse_model_config(user_config)
        except ValueError as err:
            self._record_failure(str(err))
            if self.current is None and wait:
                self._desired = ModelConfig()
                self._load_desired(fallback=True)
            return False
        self.defaults = cfg.generation
        with self._cv:
            self._desired = cfg
        if wait:
            self._load_desired(fallback=self.current is None)
        elif self._loader_thread is None or not self._loader_thread.is_alive():
            self._loader_thread = threading.Thread(target=self._load_desired, name="selflearn-loader", daemon=True)
            self._loader_thread.start()
        return True

    def _load_desired(self, fallback: bool = False) -> None:
        with self._swap_lock:  # one load at a time; the newest desired config wins
            while True:
                cfg = self._desired
                if cfg is None or (self._config is not None and cfg.weights_key == self._config.weights_key):
                    return
                self._loading = cfg.checkpoint or base_id(cfg.base_model)
                t0 = time.monotonic()
                try:
                    lm = self._load(cfg, self.options)
                except Exception as err:  # bad checksum, missing files, unreachable store, bad model id
                    self._record_failure(f"loading {self._loading} failed: {type(err).__name__}: {err}")
                    with self._cv:
                        if self._desired is cfg:
                            self._desired = None
                    self._loading = None
                    if fallback and self.current is None:
                        self._desired = self._fallback_config(cfg)
                        if self._desired is not None:
                            continue
                        raise
                    return
                finally:
                    self._loading = None
                lm.loaded_at = time.time()
                with self._cv:
                    self.current, self._config = lm, cfg
                    self.stats["swaps"] += 1
                    self.stats["last_swap_seconds"] = round(time.monotonic() - t0, 3)
                    self._cv.notify_all()
                log.info("now serving %s", lm.checkpoint_id)

    @staticmethod
    def _fallback_config(failed: ModelConfig) -> ModelConfig | None:
        """A replica with nothing loaded falls back to the base model, then the embedded one."""
        if failed.checkpoint:
            return failed.model_copy(update={"checkpoint": None})
        default = ModelConfig()
        return default if failed.base_model != default.base_model else None

    def _record_failure(self, message: str) -> None:
        log.error("%s", message)
        self.stats["swap_failures"] += 1
        self.stats["last_swap_error"] = message
        self.stats["last_swap_error_at"] = time.time()

    def wait_idle_loader(self, timeout: float | None = None) -> None:
        t = self._loader_thread
        if t is not None:
            t.join(timeout)

    # -- requests --------------------------------------------------------------------------------
    def resolve_params(self, *, max_new_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None,
                       repetition_penalty: float | None = None, stop: list[str] | None = None,
                       seed: int | None = None) -> SamplingParams:
        d = self.defaults
        cap = self.options.max_new_tokens_cap

        def pick(v, default):
            return default if v is None else v

        return SamplingParams(
            max_new_tokens=max(1, min(pick(max_new_tokens, d.max_length), cap)),
            temperature=float(pick(temperature, d.temperature)), top_p=float(pick(top_p, d.top_p)),
            top_k=int(pick(top_k, d.top_k)), repetition_penalty=float(pick(repetition_penalty, d.repetition_penalty)),
            stop=tuple(pick(stop, d.stop)), seed=seed)

    def submit(self, messages: list[dict], params: SamplingParams, sink: Sink) -> Ticket:
        """Queue a request; events arrive at `sink` (from the scheduler thread). Raises QueueFull/NotReady."""
        ticket = Ticket(messages, params, sink)
        ticket.engine = self
        with self._cv:
            if self.current is None:
                raise NotReady("the model is still loading")
            if params.seed is not None and params.temperature > 0:
                import torch

                ticket.generator = torch.Generator(device=self.current.model.device).manual_seed(params.seed)
            if len(self._waiting) >= self.options.max_queue:
                raise QueueFull(f"the queue is full ({self.options.max_queue} waiting)")
            self._waiting.append(ticket)
            self.stats["requests"] += 1
            self._cv.notify_all()
        return ticket

    def generate(self, messages: list[dict], params: SamplingParams, timeout: float | None = None) -> Done:
        """Blocking convenience: the `Done` event (or raises RuntimeError on an `Error` event)."""
        result: list[Done | Error] = []
        done = threading.Event()

        def sink(ev: EngineEvent) -> None:
            if isinstance(ev, END_EVENTS):
                result.append(ev)
                done.set()

        ticket = self.submit(messages, params, sink)
        if not done.wait(timeout):
            ticket.cancel()
            raise TimeoutError("generation timed out")
        end = result[0]
        if isinstance(end, Error):
            raise RuntimeError(end.message)
        return end

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
                    admit = []
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
            self.stats["step_errors"] += 1
            self.stats["last_error"] = f"generation failed: {type(err).__name__}: {err}"
            self.stats["last_error_at"] = time.time()
            ids = {id(r) for r in rows}
            for b in self._batches:
                if any(id(r) in ids for r in b.rows):
                    b.rows = []
            for r in rows:
                if not r.done:
                    r.fail(500, "generation failed; see the server log")

    def _prefill(self, tickets: list[Ticket], lm: loader_mod.LoadedModel) -> None:
        import torch

        from .decode import HeadroomCache

        context = min(lm.context_length, self.options.max_context_tokens)
        rows, prompts = [], []
        for t in tickets:
            try:
                ids, dropped = lm.encode(t.messages, context - t.params.max_new_tokens)
            except loader_mod.PromptTooLong as err:
                t.fail(422, str(err))
                continue
            t.start(lm, len(ids), dropped)
            rows.append(t)
            prompts.append(ids)
        if not rows:
            return
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
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        self.stats["generated_tokens"] += len(rows)
        group.keep([i for i, r in enumerate(group.rows) if not r.done])
        if not group.rows:
            return
        home = next((b for b in self._batches if b.lm is lm and b.rows), None)
        if home is None:
            self._batches.append(group)
        else:
            home.merge(group)

    def _step(self, batch: Batch) -> None:
        import torch

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
        self.stats["generated_tokens"] += len(batch.rows)
        batch.keep([i for i, r in enumerate(batch.rows) if not r.done])

    # -- introspection ---------------------------------------------------------------------------
    def status(self) -> dict:
        cur = self.current
        desired = self._desired
        failed_at = self.stats["last_swap_error_at"]
        return {
            "ready": cur is not None,
            "checkpoint": cur.checkpoint_id if cur else None,
            "checkpoint_uri": cur.uri if cur else None,
            "base_model": cur.base_model if cur else None,
            "dtype": cur.dtype if cur else None,
            "chat_template": cur.chat_template if cur else None,
            "loaded_at": cur.loaded_at if cur else None,
            "load_seconds": round(cur.load_seconds, 3) if cur else None,
            "loading": self._loading,
            "desired": (desired.checkpoint or base_id(desired.base_model)) if desired else None,
            # The newest swap attempt failed and nothing has loaded since: serving older weights.
            "degraded": failed_at is not None and (cur is None or failed_at > cur.loaded_at),
            "queue_depth": len(self._waiting),
            "running": self._running_rows(),
            "batches": [{"checkpoint": b.lm.checkpoint_id, "rows": len(b.rows)} for b in list(self._batches)],
            "generation_defaults": self.defaults.model_dump(),
            **self.stats,
        }

    def check_health(self, stall_seconds: float = 120.0) -> None:
        """Raise if the replica cannot answer: no weights, dead scheduler, or a stuck step."""
        if not self._thread.is_alive():
            raise RuntimeError("the scheduler thread died")
        if self.current is None:
            raise RuntimeError("no model loaded")
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
