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
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..checkpoints import CheckpointError
from ..contracts import RoundResult
from ..spec import RunConfig
from . import trainer_process
from .recovery import reconcile, remove_incomplete
from .serving import serving_id, swap_serving
from .state import apply_result, next_round, short_id, startup_serving
from .state_file import STATE_FILE, load_state, save_state

log = logging.getLogger("selflearn.local")

RUN_CONFIG_FILE = "run.yaml"  # the run as the trainer subprocess reads it, in the data dir


class Stopped(Exception):
    """The driver was asked to stop."""


class LocalDriver:
    """Runs rounds, decides, swaps serving. `server` is a selflearn.serving.app.LocalServe or None."""

    def __init__(self, config: RunConfig, data_dir: str | Path, *, server: Any = None, nice: int = 10,
                 python: str = sys.executable, trainer_env: dict[str, str] | None = None,
                 swap_timeout: float = 300, on_event: Callable[[str, dict], None] | None = None):
        from ..trainer.round import open_store

        self.config = config
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.data_dir / STATE_FILE
        self.store = open_store(config)
        self.server = server
        self.nice = nice
        self.python = python
        self.trainer_env = trainer_env or {}
        self.swap_timeout = swap_timeout
        self.on_event = on_event or (lambda kind, doc: None)
        self.stop_event = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.state = load_state(self.state_path, config)

    # -- lifecycle -------------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Clean debris of an interrupted round, reconcile with the store, write the run config."""
        import yaml

        run = self.config.name
        self.store.check()
        gone = remove_incomplete(self.store, run)
        if gone:
            log.info("removed incomplete checkpoint directories of an interrupted round: %s", gone)
        shutil.rmtree(self.data_dir / "tmp", ignore_errors=True)
        self.state, _ = reconcile(self.state, self.store, self.config.spec)
        store_promoted = self.store.promoted(run)
        want = startup_serving(self.state, self.config.spec.promotion, store_promoted.uri if store_promoted else None)
        if want and (store_promoted is None or store_promoted.uri != want):
            self.store.set_promoted(self.store.ref_for_uri(want))
        self.state["promoted"], self.state["promoted_id"] = want, short_id(want)
        self.state["current_round"] = None
        self.state["phase"] = "serving"
        self.state["base_model"] = self.config.spec.base_model
        (self.data_dir / RUN_CONFIG_FILE).write_text(
            yaml.safe_dump(self.config.model_dump(by_alias=True, mode="json", exclude_none=True), sort_keys=False))
        self.save()
        return self.state

    def save(self) -> None:
        save_state(self.state_path, self.state)

    def stop(self) -> None:
        self.stop_event.set()

    def next_round(self) -> int:
        run = self.config.name
        store_state = self.store.get_json(f"{run}/state.json") or {}
        latest = self.store.latest(run)
        return next_round(self.state, store_last_round=store_state.get("last_round") or 0,
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
        cmd = trainer_process.trainer_command(self.python, self.data_dir / RUN_CONFIG_FILE, round_, parent, workdir,
                                              progress, self.nice)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.trainer_env}
        log_path = trainer_process.round_log(logs, round_)
        with open(log_path, "ab") as err, tempfile.TemporaryFile() as out:
            self.proc = proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                                start_new_session=True)
            self.state["trainer_pid"] = proc.pid
            self.save()
            try:
                self._wait_for(proc, progress)
            finally:
                if proc.poll() is None:
                    trainer_process.terminate(proc)
                self.proc = None
                self.state.pop("trainer_pid", None)
            out.seek(0)
            stdout = out.read().decode(errors="replace")
        return trainer_process.read_result(proc.returncode, stdout, log_path, round_)

    def _wait_for(self, proc: subprocess.Popen, progress: Path) -> None:
        """Until the trainer exits, copy its live progress into the state the dashboard reads;
        raise Stopped (after terminating it) when asked to stop."""
        seen = None
        while proc.poll() is None:
            if self.stop_event.wait(0.5):
                trainer_process.terminate(proc)
                raise Stopped()
            seen, doc = trainer_process.read_progress(progress, seen)
            cur = self.state.get("current_round")
            if doc is not None and isinstance(cur, dict):
                trainer_process.merge_progress(cur, doc)
                self.save()

    def swap(self, uri: str | None) -> None:
        """Point serving at `uri` and wait until the replica answers with it."""
        self.state["phase"] = "swapping"
        self.save()
        if self.server is not None:
            swap_serving(self.server, self.config, uri, timeout=self.swap_timeout)
        # What serving reports (not the status' current id, which before the swap is still the
        # checkpoint being replaced).
        self.state["serving"], self.state["serving_id"] = uri, serving_id(self.config, uri)
        self.state["served_at"] = time.time()

    def _published_manifest(self, result: RoundResult) -> tuple[RoundResult, dict[str, Any] | None]:
        """The manifest of a published round; a failed result instead if it cannot be read."""
        if result.status != "published" or result.checkpoint is None:
            return result, None
        try:
            return result, self.store.manifest(self.store.ref_for_uri(result.checkpoint))
        except (CheckpointError, ValueError) as err:
            return RoundResult("failed", result.round, reason=f"published checkpoint unreadable: {err}"), None

    def run_round(self, round_: int) -> dict[str, Any]:
        """Train, decide, promote and swap; returns the round's record."""
        parent = self.state.get("promoted")
        self.state["phase"], self.state["current_round"] = "training", {"round": round_, "started_at": time.time(),
                                                                         "parent": parent}
        self.save()
        self.on_event("training", {"round": round_, "parent": parent})
        result, manifest = self._published_manifest(self.train(round_, parent))
        self.state["phase"] = "evaluating"
        self.state, action = apply_result(self.state, result, manifest, self.config.spec)
        rec = self.state["rounds"][-1]
        if action.promote and action.serve:
            self.store.set_promoted(self.store.ref_for_uri(action.serve))
        self.save()
        if action.serve:
            self.swap(action.serve)
            if rec.get("published_at") and action.serve == rec.get("checkpoint"):
                rec["publish_to_serve_s"] = round(self.state["served_at"] - rec["published_at"], 2)
        self.state["phase"] = "serving"
        self.save()
        self.on_event("round", rec)
        return rec

    def loop(self, *, rounds: int | None = None, interval: float = 0) -> dict[str, Any]:
        """Run `rounds` rounds (None: until stopped), `interval` seconds apart."""
        done = 0
        try:
            while rounds is None or done < rounds:
                if self.stop_event.is_set():
                    break
                rec = self.run_round(self.next_round())
                done += 1
                if rec["status"] == "failed":
                    log.warning("round %s failed: %s", rec["round"], rec.get("reason"))
                if (rounds is None or done < rounds) and self.stop_event.wait(interval if rec["status"] != "failed"
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
        self.state["current_round"] = None
        self.state.pop("trainer_pid", None)
        self.state["phase"] = "stopped"
        self.save()
