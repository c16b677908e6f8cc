"""`LocalDriver`: local mode's loop, round after round: train in a subprocess, decide, promote,
swap serving, record.

State survives restart: the round counter, the promoted checkpoint and every round's record live
in the state file, and the store itself (manifests, `promoted.json`, the trainer's source cursors)
is the source of truth it is reconciled with on start, so a crash between publish and record
loses nothing.

Stopping (Ctrl-C, SIGTERM) terminates the trainer subprocess, removes the round directory it may
have half-uploaded (never listed anyway: it has no manifest) and its scratch dir, and records the
state; `serving.stop_serving` then shuts down Serve and the Ray it started.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints import CheckpointError
from ..contracts import RoundResult
from ..spec import RunConfig
from . import trainer_process
from .events import Listener, RoundProgressed, RoundRecorded, RoundStarted, ignore
from .records import RoundManifest, RoundRecord
from .recovery import reconcile, remove_incomplete
from .serving import swap_serving
from .state import LocalState, apply_result, in_phase, next_round, prepared, progressed, round_started, served, \
    startup_serving, stopped, timed_publish_to_serve, trainer_started
from .state_file import STATE_FILE, load_state, save_state
from .trainer_process import TrainerOptions

if TYPE_CHECKING:
    from ..serving.app import LocalServe

log = logging.getLogger("selflearn.local")

RUN_CONFIG_FILE = "run.yaml"  # the run as the trainer subprocess reads it, in the data dir


class Stopped(Exception):
    """The driver was asked to stop."""


class LocalDriver:
    """Runs rounds, decides, swaps serving. `server`: the running Serve app, or None (headless).

    `state` is replaced, never edited: each step of a round makes a new one (the pure functions
    of `state`), and `_set` writes it where the dashboard reads it."""

    def __init__(self, config: RunConfig, data_dir: str | Path, *, server: LocalServe | None = None,
                 trainer: TrainerOptions | None = None, swap_timeout: float = 300, on_event: Listener = ignore):
        from ..trainer.round import open_store

        self.config = config
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.data_dir / STATE_FILE
        self.store = open_store(config)
        self.server = server
        self.trainer = trainer or TrainerOptions()
        self.swap_timeout = swap_timeout
        self.on_event = on_event
        self.stop_event = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.state: LocalState = load_state(self.data_dir, config)

    # -- lifecycle -------------------------------------------------------------------------------
    def prepare(self) -> LocalState:
        """Clean debris of an interrupted round, reconcile with the store, write the run config."""
        import yaml

        run = self.config.name
        self.store.check()
        gone = remove_incomplete(self.store, run)
        if gone:
            log.info("removed incomplete checkpoint directories of an interrupted round: %s", gone)
        shutil.rmtree(self.data_dir / "tmp", ignore_errors=True)
        state, _ = reconcile(self.state, self.store, self.config.spec)
        store_promoted = self.store.promoted(run)
        want = startup_serving(state, self.config.spec.promotion, store_promoted.uri if store_promoted else None)
        if want and (store_promoted is None or store_promoted.uri != want):
            self.store.set_promoted(self.store.ref_for_uri(want))
        (self.data_dir / RUN_CONFIG_FILE).write_text(
            yaml.safe_dump(self.config.model_dump(by_alias=True, mode="json", exclude_none=True), sort_keys=False))
        self._set(prepared(state, promoted=want, base_model=self.config.spec.base_model))
        return self.state

    def _set(self, state: LocalState) -> None:
        """The new state, written where the dashboard and `selflearn status` read it."""
        self.state = state
        save_state(self.state_path, state)

    def on_served(self, checkpoint: str | None) -> None:
        self._set(served(self.state, checkpoint, now=time.time()))

    def stop(self) -> None:
        self.stop_event.set()

    def next_round(self) -> int:
        from ..trainer.inputs import STATE_KEY

        run = self.config.name
        cursors = self.store.get_json(f"{run}/{STATE_KEY}") or {}  # the trainer's own state: its last round
        latest = self.store.latest(run)
        return next_round(self.state, store_last_round=int(cursors.get("last_round") or 0),
                          latest_published=latest.round if latest else 0)

    # -- one round -------------------------------------------------------------------------------
    def train(self, round_: int, parent: str | None) -> RoundResult:
        """Run `selflearn train` in a niced subprocess; its result line, or a failed result."""
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        workdir = self.data_dir / "tmp"
        workdir.mkdir(exist_ok=True)
        progress = workdir / "progress.json"
        progress.unlink(missing_ok=True)
        cmd = trainer_process.trainer_command(self.trainer, self.data_dir / RUN_CONFIG_FILE, round_, parent, workdir,
                                              progress)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.trainer.env}
        log_path = trainer_process.round_log(logs, round_)
        with open(log_path, "ab") as err, tempfile.TemporaryFile() as out:
            self.proc = proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                                start_new_session=True)
            self._set(trainer_started(self.state, proc.pid))
            try:
                self._wait_for(proc, progress)
            finally:
                if proc.poll() is None:
                    trainer_process.terminate(proc)
                self.proc = None
                self.state = trainer_started(self.state, None)
            out.seek(0)
            stdout = out.read().decode(errors="replace")
        return trainer_process.read_result(proc.returncode, stdout, log_path, round_)

    def _wait_for(self, proc: subprocess.Popen[bytes], progress: Path) -> None:
        """Until the trainer exits, copy its live progress into the state the dashboard reads and
        tell the listener; raise Stopped (after terminating it) when asked to stop."""
        seen = None
        while proc.poll() is None:
            if self.stop_event.wait(0.5):
                trainer_process.terminate(proc)
                raise Stopped()
            seen, doc = trainer_process.read_progress(progress, seen)
            if doc is not None:
                self._set(progressed(self.state, doc))
                self.on_event(RoundProgressed(doc))

    def swap(self, uri: str | None) -> None:
        """Point serving at `uri` and wait until the replica answers with it."""
        self._set(in_phase(self.state, "swapping"))
        if self.server is not None:
            swap_serving(self.server, self.config, uri, timeout=self.swap_timeout)
        self.state = served(self.state, uri, now=time.time())

    def _published_manifest(self, result: RoundResult) -> tuple[RoundResult, RoundManifest | None]:
        """The manifest of a published round; a failed result instead if it cannot be read."""
        if result.status != "published" or result.checkpoint is None:
            return result, None
        try:
            doc = self.store.manifest(self.store.ref_for_uri(result.checkpoint))
            return result, RoundManifest.parse(doc, what=f"the manifest of {result.checkpoint}")
        except (CheckpointError, ValueError) as err:  # ValueError: ResultError, a malformed manifest
            return RoundResult("failed", result.round, reason=f"published checkpoint unreadable: {err}"), None

    def run_round(self, round_: int) -> RoundRecord:
        """Train, decide, promote and swap; returns the round's record."""
        self._set(round_started(self.state, round_, now=time.time()))
        parent = self.state.promoted
        self.on_event(RoundStarted(round_, parent))
        result, manifest = self._published_manifest(self.train(round_, parent))
        state, action = apply_result(in_phase(self.state, "evaluating"), result, manifest, self.config.spec)
        if action.point_to:
            self.store.set_promoted(self.store.ref_for_uri(action.point_to))
        self._set(state)
        if action.serve:
            self.swap(action.serve)
            self.state = timed_publish_to_serve(self.state)
        self._set(in_phase(self.state, "serving"))
        rec = self.state.rounds[-1]
        self.on_event(RoundRecorded(rec))
        return rec

    def loop(self, *, rounds: int | None = None, interval: float = 0) -> LocalState:
        """Run `rounds` rounds (None: until stopped), `interval` seconds apart."""
        done = 0
        try:
            while rounds is None or done < rounds:
                if self.stop_event.is_set():
                    break
                rec = self.run_round(self.next_round())
                done += 1
                if rec.status == "failed":
                    log.warning("round %s failed: %s", rec.round, rec.reason)
                if (rounds is None or done < rounds) and self.stop_event.wait(interval if rec.status != "failed"
                                                                               else max(interval, 30)):
                    break
        except Stopped:
            log.info("stopped during a round; it will be retried on the next start")
        finally:
            self.finish()
        return self.state

    def finish(self) -> None:
        """Leave nothing half-done: no trainer, no incomplete checkpoint, no scratch, state recorded."""
        if self.proc is not None and self.proc.poll() is None:
            trainer_process.terminate(self.proc)
        try:
            remove_incomplete(self.store, self.config.name)
        except Exception as err:  # the store went away: it cannot hold debris we could delete
            log.warning("could not clean incomplete checkpoints: %s", err)
        shutil.rmtree(self.data_dir / "tmp", ignore_errors=True)
        self._set(stopped(self.state))
