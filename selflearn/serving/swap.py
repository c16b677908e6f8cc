"""Hot swap: which weights a replica serves, loading them, and what it does when they fail to load.

`configure(user_config)` loads new weights on a loader thread while the old ones keep answering;
installing them is a single assignment under the engine's lock. A failed load leaves the old
weights in place and marks the replica degraded with the reason (`status()`).

A replica with nothing loaded whose weights fail to load serves nothing: it is not ready and is
degraded with the reason, and it retries the load with backoff. Only with
`EngineOptions.allow_base_fallback` does it serve the base model instead (then the embedded one),
still degraded with the reason, so a bad checkpoint never passes for the one asked for.

`HotSwap` is the `Engine`'s half that owns this; the scheduler half (engine.py) reads `current`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from typing import Any, Callable

from ..contracts import EngineCounters, WeightsStatus, base_id
from . import loader as loader_mod
from ..spec import MemoryUseSpec
from .config import EngineOptions, GenerationDefaults, ModelConfig, parse_model_config

log = logging.getLogger(__name__)


def _release_when_gone(ref: "weakref.ref[Any] | None", timeout_s: float = 900.0) -> None:
    """Give freed memory back to the OS now, and again once the object `ref` points to (the old
    weights, still held by requests that started on them) is gone: a thread of its own, so that
    neither the loader nor the scheduler waits for the last of those requests."""
    loader_mod.release_freed_memory()
    if ref is None:
        return

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while ref() is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        loader_mod.release_freed_memory()

    threading.Thread(target=watch, name="selflearn-release", daemon=True).start()


def fallback_configs(failed: ModelConfig | None) -> list[ModelConfig]:
    """What a replica with nothing loaded may serve instead of `failed` (None: an unreadable
    config), in order: the checkpoint's base model, then the embedded one."""
    embedded = ModelConfig()
    if failed is None:
        return [embedded]
    out = [failed.model_copy(update={"checkpoint": None})] if failed.checkpoint else []
    if failed.base_model != embedded.base_model:
        out.append(failed.model_copy(update={"checkpoint": None, "base_model": embedded.base_model}))
    return out


class HotSwap:
    """The weights of an engine: the one loaded, the one asked for, loading, fallback and retry."""

    # Backoff of the load retried while nothing is loaded (doubling up to the second figure).
    RETRY_FIRST_S, RETRY_MAX_S = 30.0, 1800.0

    options: EngineOptions
    counters: EngineCounters
    _cv: threading.Condition

    def _init_weights(self, load: loader_mod.Load) -> None:
        self._load = load
        self._swap_lock = threading.Lock()
        self.current: loader_mod.LoadedModel | None = None
        self._config: ModelConfig | None = None
        self._desired: ModelConfig | None = None
        self.defaults = GenerationDefaults()
        self.memory_use = MemoryUseSpec()
        self._loading: str | None = None
        self._loader_thread: threading.Thread | None = None
        # Why the weights asked for are not the ones serving (None: they are): `degraded`.
        self._failure: str | None = None
        # Nothing loaded after a failed load: the config retried, and when (see `_retry_if_due`).
        self._retry: ModelConfig | None = None
        self._retry_at, self._retry_delay = 0.0, self.RETRY_FIRST_S

    def configure(self, user_config: Any, *, wait: bool = False) -> bool:
        """Adopt a user_config. Never raises for a bad config or a failed load: the old weights stay.

        With wait=True this call returns once the load is done (first load of a replica); otherwise
        the load runs while the current weights keep answering. Returns False if the config was
        rejected outright. A replica left with nothing loaded serves nothing (not ready, degraded
        with the reason) unless `options.allow_base_fallback`: then the base model, still degraded.
        """
        try:
            cfg = parse_model_config(user_config)
        except ValueError as err:
            self._record_failure(str(err))
            self._retry = None  # the config it replaces is no longer wanted either
            if self.current is None and wait:
                _on_a_thread_of_its_own(lambda: self._fall_back(fallback_configs(None)))
            return False
        self.defaults, self.memory_use = cfg.generation, cfg.memory
        with self._cv:
            self._desired = cfg
        if wait:
            first = self.current is None
            _on_a_thread_of_its_own(lambda: self._load_desired(first=first))
        else:
            self._start_loader()
        return True

    def _start_loader(self) -> None:
        if self._loader_thread is None or not self._loader_thread.is_alive():
            self._loader_thread = threading.Thread(target=self._load_desired, name="selflearn-loader", daemon=True)
            self._loader_thread.start()

    def _load_desired(self, first: bool = False) -> None:
        with self._swap_lock:  # one load at a time; the newest desired config wins
            while True:
                cfg = self._desired
                if cfg is None:
                    return
                if self._config is not None and cfg.weights_key == self._config.weights_key:
                    self._failure = None  # what is asked for is what serves
                    return
                name = cfg.checkpoint or base_id(cfg.base_model)
                try:
                    self._install(cfg, failure=None)
                    self._retry = None
                    continue  # a newer config may have come while this one loaded
                except Exception as err:  # bad checksum, missing files, unreachable store, bad model id
                    self._record_failure(f"loading {name} failed: {type(err).__name__}: {err}")
                with self._cv:
                    if self._desired is cfg:
                        self._desired = None
                if self._desired is None and self.current is None:
                    if first:
                        self._fall_back(fallback_configs(cfg))
                    if self.current is None:
                        self._schedule_retry(cfg)

    def _install(self, cfg: ModelConfig, *, failure: str | None) -> None:
        """Load `cfg`'s weights and make them the ones new requests start on; raises if the load
        fails. `failure` (None: not degraded) is set with the weights, in one step, so that no
        one reads a status that is ready with the old reason, or degraded without one."""
        self._loading = cfg.checkpoint or base_id(cfg.base_model)
        t0 = time.monotonic()
        try:
            lm = self._load(cfg, self.options)
        finally:
            self._loading = None
        lm.loaded_at = time.time()
        with self._cv:
            old, self.current, self._config = self.current, lm, cfg
            self._failure = failure
            self.counters.swaps += 1
            self.counters.last_swap_seconds = round(time.monotonic() - t0, 3)
            self._cv.notify_all()
        log.info("now serving %s", lm.checkpoint_id)
        # The load's temporaries are garbage now; the old weights once their last request ends.
        _release_when_gone(weakref.ref(old) if old is not None else None)

    def _fall_back(self, candidates: list[ModelConfig]) -> None:
        """Nothing loaded and the weights asked for failed: serve the first candidate that loads, if
        allowed, still degraded with the reason; else stay unready, never passing one model off as another."""
        reason = self._failure
        if not self.options.allow_base_fallback:
            log.error("serving nothing: %s (allow_base_fallback is off: not ready until weights load)", reason)
            return
        for cfg in candidates:
            name = base_id(cfg.base_model)
            try:
                self._install(cfg, failure=f"{reason}; serving {name} instead")
            except Exception as err:
                reason = f"{reason}; falling back to {name} failed too: {type(err).__name__}: {err}"
                log.error("%s", reason)
                continue
            log.warning("degraded: %s", self._failure)
            return
        self._failure = reason

    def _schedule_retry(self, cfg: ModelConfig) -> None:
        if cfg != self._retry:
            self._retry, self._retry_delay = cfg, self.RETRY_FIRST_S
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.RETRY_MAX_S)

    def _retry_if_due(self) -> None:
        """With nothing loaded, load the config that failed again once its backoff is over: a store
        that was down when the replica started heals without a restart."""
        cfg = self._retry
        if cfg is None or self.current is not None or self._loading or time.monotonic() < self._retry_at:
            return
        with self._cv:
            if self._desired is None:
                self._desired = cfg
        self._retry_at = time.monotonic() + self._retry_delay  # a failed attempt reschedules itself
        self._start_loader()

    def _weights_fault(self) -> str | None:
        """What a restart would mend about the weights (None: nothing); retries a failed load when due.

        No weights because they failed to load is not such a fault: a new replica would fail the
        same way, and Serve replaces a replica whose health check raises, so it would loop."""
        if self.current is not None:
            return None
        if self._failure is None and self._desired is None and not self._loading:
            return "no model loaded and none asked for"
        self._retry_if_due()
        return None

    def weights_status(self) -> WeightsStatus:
        cur, desired = self.current, self._desired
        # Degraded: what serves (if anything) is not what was asked for; the reason says why.
        wanted = WeightsStatus(loading=self._loading,
                               desired=(desired.checkpoint or base_id(desired.base_model)) if desired else None,
                               degraded=self._failure is not None, degraded_reason=self._failure)
        if cur is None:
            return wanted
        return dataclasses.replace(wanted, ready=True, checkpoint=cur.checkpoint_id, checkpoint_uri=cur.uri,
                                   base_model=cur.base_model, dtype=cur.dtype, engine=cur.engine, chat_template=cur.chat_template,
                                   loaded_at=cur.loaded_at, load_seconds=round(cur.load_seconds, 3),
                                   memory_passages=len(cur.memory.passages) if cur.memory is not None else None)

    def _record_failure(self, message: str) -> None:
        log.error("%s", message)
        self._failure = message
        self.counters.swap_failures += 1
        self.counters.last_swap_error = message
        self.counters.last_swap_error_at = time.time()


def _on_a_thread_of_its_own(fn: Callable[[], None]) -> None:
    """Run `fn` on a short-lived thread and wait for it.

    Loading weights runs parallel torch ops, and PyTorch's OpenMP runtime keeps a pool of worker
    threads for every thread that ever ran one, for that thread's life. With a second pool alive
    (a replica's main thread, say) libgomp sees more threads than cores and all but stops spinning
    between parallel regions, so every op of the engine's scheduler waits for its workers to be
    woken: on 2 cores a decode step of the embedded model took 93 ms instead of 52. A loader
    thread's pool goes with the thread, so the caller of `configure` never holds one.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as err:  # re-raised in the caller, as if it had run there
            failure.append(err)

    thread = threading.Thread(target=run, name="selflearn-loader", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
