"""`selflearn local`: the whole learning loop on one machine.

    serve (base model, or the promoted checkpoint when resuming)
    loop:  train round N in a niced subprocess  ->  metrics from the round's manifest
           ->  selflearn.policy.decide  ->  promote: store.set_promoted + hot-swap serving
           ->  record the round in <data-dir>/state.json (also the dashboard's /api/rounds)

The decisions are pure functions (`apply_result`, `next_round`, `reconcile`) over a JSON state
dict, so they are tested without Ray or a model. `LocalDriver` does the I/O: the trainer
subprocess, the store, the serving handle. State survives restart: the round counter, the
promoted checkpoint and every round's record live in the state file, and the store itself
(manifests, `promoted.json`, the trainer's source cursors) is the source of truth it is
reconciled with on start, so a crash between publish and record loses nothing.

Stopping (Ctrl-C, SIGTERM) terminates the trainer subprocess, removes the round directory it
may have half-uploaded (never listed anyway: it has no manifest) and its scratch dir, records
the state, and shuts down Serve and the Ray it started.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .checkpoints import MANIFEST, CheckpointError, CheckpointStore, round_dir
from .feedback import feedback_uri
from .policy import Decision, decide_for
from .spec import PromotionSpec, RunConfig

log = logging.getLogger("selflearn.local")

STATE_FILE = "state.json"
RUN_CONFIG_FILE = "run.yaml"
STATE_VERSION = 1
MAX_LOSS_POINTS = 400  # per round, in the state file (the manifest keeps all of them)


# -- state (pure) ---------------------------------------------------------------------------------
def new_state(config: RunConfig) -> dict[str, Any]:
    return {"version": STATE_VERSION, "run": config.name, "base_model": config.spec.base_model,
            "store": config.spec.storage.uri, "round": 0, "promoted": None, "promoted_id": None,
            "serving": None, "serving_id": None, "phase": "starting", "current_round": None,
            "rounds": [], "updated_at": time.time()}


def load_state(path: Path, config: RunConfig) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return new_state(config)
    except json.JSONDecodeError as err:
        raise ValueError(f"state file {path} is not valid JSON ({err}); move it away to start afresh") from None
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise ValueError(f"state file {path} is not a selflearn local state (version {STATE_VERSION})")
    if doc.get("run") != config.name or doc.get("store") != config.spec.storage.uri:
        raise ValueError(f"state file {path} belongs to run {doc.get('run')!r} on {doc.get('store')}, not "
                         f"{config.name!r} on {config.spec.storage.uri}; use another --data-dir")
    return {**new_state(config), **doc}


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write-then-rename: the dashboard and `selflearn status` never read a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state["updated_at"] = time.time()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_id(uri: str | None) -> str | None:
    """`file:///x/local/r000003` -> `local/r000003` (the id serving reports)."""
    if not uri:
        return None
    parts = uri.rstrip("/").rsplit("/", 2)
    return "/".join(parts[-2:]) if len(parts) == 3 else uri


def _downsample(xs: list[float], n: int) -> list[float]:
    if len(xs) <= n:
        return list(xs)
    step = len(xs) / n
    return [xs[int(i * step)] for i in range(n)]


def round_record(result: dict[str, Any], manifest: dict[str, Any] | None,
                 decision: Decision | None) -> dict[str, Any]:
    """What the dashboard and `selflearn status` show about one round."""
    manifest = manifest or {}
    metrics = {**(manifest.get("metrics") or {}), **(result.get("metrics") or {})}
    rec: dict[str, Any] = {
        "round": result.get("round"),
        "status": result.get("status", "failed"),
        "checkpoint": result.get("checkpoint"),
        "id": result.get("id") or checkpoint_id(result.get("checkpoint")),
        "parent": result.get("parent") or manifest.get("parent"),
        "promoted": bool(decision and decision.promote),
        "reason": decision.reason if decision else result.get("reason"),
        "train_loss": metrics.get("train_loss"),
        "losses": _downsample(list(metrics.get("losses") or []), MAX_LOSS_POINTS),
        "ppl": metrics.get("ppl") or {},
        "steps": metrics.get("steps"),
        "train_seconds": metrics.get("train_seconds"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "articles": [{"title": a.get("title"), "url": a.get("url"), "sha256": a.get("sha256")}
                     for a in manifest.get("articles") or []],
        "held_out": metrics.get("held_out"),
        "dropped": metrics.get("dropped"),
        # What a chat user notices: answers about the learned and held-out articles, chat manners.
        "knowledge": metrics.get("knowledge") or {},
        "chat": metrics.get("chat") or {},
        "format": metrics.get("format"),
        "qa_pairs": metrics.get("qa_pairs"),
        # What users said that this round learned (ids as /feedback answered them).
        "feedback": {**(metrics.get("feedback") or {}),
                     "ids": [f.get("id") for f in manifest.get("feedback") or []]} if "feedback" in metrics else None,
        "examples": (manifest.get("probe") or {}).get("examples") or [],  # a few, chosen by the trainer
        "published_at": manifest.get("published_at"),
        "finished_at": time.time(),
    }
    return rec


@dataclass(frozen=True)
class Action:
    """What the driver must do after a round: point serving (and the store's pointer) at `serve`."""

    serve: str | None
    promote: bool
    decision: Decision | None


def decide_round(state: dict[str, Any], result: dict[str, Any], promotion: PromotionSpec) -> Decision | None:
    if result.get("status") != "published":
        return None
    return decide_for(promotion, result.get("metrics"), candidate=result.get("checkpoint"),
                      serving=state.get("serving"))


def apply_result(state: dict[str, Any], result: dict[str, Any], manifest: dict[str, Any] | None,
                 promotion: PromotionSpec) -> tuple[dict[str, Any], Action]:
    """Given a round's result (the trainer's JSON line) and its manifest: the new state and the action.

    A published or empty round advances the round counter; a failed one does not (it is retried
    under the same number). Only a promoted checkpoint, or a pin, changes what serves.
    """
    state = copy.deepcopy(state)
    decision = decide_round(state, result, promotion)
    rec = round_record(result, manifest, decision)
    state["rounds"] = [r for r in state["rounds"] if not (r.get("round") == rec["round"] and r.get("status") == "failed")]
    state["rounds"].append(rec)
    state["current_round"] = None
    if rec["status"] in ("published", "empty"):
        state["round"] = max(int(state.get("round") or 0), int(rec["round"]))
    serve = None
    if decision is not None and decision.serve and decision.serve != state.get("serving"):
        serve = decision.serve
    if decision is not None and decision.serve:
        state["promoted"], state["promoted_id"] = decision.serve, checkpoint_id(decision.serve)
    return state, Action(serve=serve, promote=bool(decision and decision.serve), decision=decision)


def startup_serving(state: dict[str, Any], promotion: PromotionSpec, store_promoted: str | None) -> str | None:
    """What to serve at start: a pin wins, then the store's pointer, then the state's; None: the base model."""
    return promotion.pinned_checkpoint or store_promoted or state.get("promoted")


def next_round(state: dict[str, Any], *, store_last_round: int = 0, latest_published: int = 0) -> int:
    """One past everything anyone has seen: the state, the trainer's cursor state and the store."""
    return max(int(state.get("round") or 0), int(store_last_round or 0), int(latest_published or 0)) + 1


def reconcile(state: dict[str, Any], store: CheckpointStore, promotion: PromotionSpec) -> tuple[dict[str, Any], Action | None]:
    """Record checkpoints the store holds but the state does not (the driver died between publish
    and record), deciding on each from its manifest's metrics, oldest first."""
    known = {r.get("round") for r in state["rounds"] if r.get("status") == "published"}
    last: Action | None = None
    for ref in store.list(state["run"]):
        if ref.round in known or ref.round <= int(state.get("round") or 0):
            continue  # recorded already: nothing to decide
        try:
            manifest = store.manifest(ref)
        except CheckpointError:
            continue
        metrics = {k: v for k, v in (manifest.get("metrics") or {}).items() if k != "losses"}
        result = {"status": "published", "round": ref.round, "checkpoint": ref.uri, "id": ref.id,
                  "parent": manifest.get("parent"), "metrics": metrics}
        state, action = apply_result(state, result, manifest, promotion)
        last = action if action.serve else last
    return state, last


# -- I/O -------------------------------------------------------------------------------------------
def remove_incomplete(store: CheckpointStore, run: str) -> list[str]:
    """Delete round directories without a manifest (an interrupted upload); returns their names."""
    gone = []
    for d in store.backend.list_dirs(run):
        if d.startswith("r") and d[1:].isdigit() and store.backend.get_bytes(f"{run}/{d}/{MANIFEST}") is None:
            store.backend.delete_prefix(f"{run}/{d}")
            gone.append(d)
    return gone


class Stopped(Exception):
    """The driver was asked to stop."""


class LocalDriver:
    """Runs rounds, decides, swaps serving. `server` is a selflearn.serving.app.LocalServe or None."""

    def __init__(self, config: RunConfig, data_dir: str | Path, *, server: Any = None, nice: int = 10,
                 python: str = sys.executable, trainer_env: dict[str, str] | None = None,
                 swap_timeout: float = 300, on_event: Callable[[str, dict], None] | None = None):
        from .trainer.round import open_store

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
        self.state, _ = reconcile(self.state, self.store, self.config.spec.promotion)
        store_promoted = self.store.promoted(run)
        want = startup_serving(self.state, self.config.spec.promotion, store_promoted.uri if store_promoted else None)
        if want and (store_promoted is None or store_promoted.uri != want):
            self.store.set_promoted(self.store.ref_for_uri(want))
        self.state["promoted"], self.state["promoted_id"] = want, checkpoint_id(want)
        self.state["current_round"] = None
        self.state["phase"] = "serving"
        self.state["base_model"] = self.config.spec.base_model
        (self.data_dir / RUN_CONFIG_FILE).write_text(
            yaml.safe_dump(self.config.model_dump(by_alias=True, mode="json", exclude_none=True), sort_keys=False))
        self.save()
        return self.state

    def user_config(self, checkpoint: str | None) -> dict[str, Any]:
        st = self.config.spec.storage
        uc: dict[str, Any] = {"checkpoint": checkpoint, "base_model": self.config.spec.base_model}
        if st.endpoint:
            uc["storage_endpoint"] = st.endpoint
        if st.region:
            uc["storage_region"] = st.region
        return uc

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
    def train(self, round_: int, parent: str | None) -> dict[str, Any]:
        """Run `selflearn train` in a niced subprocess; its JSON line, or a failed result."""
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        workdir = self.data_dir / "tmp"
        workdir.mkdir(exist_ok=True)
        progress = workdir / "progress.json"
        progress.unlink(missing_ok=True)
        cmd = [self.python, "-m", "selflearn.trainer", "--run-config", str(self.data_dir / RUN_CONFIG_FILE),
               "--round", str(round_), "--parent", parent or "base", "--workdir", str(workdir), "--no-progress",
               "--progress-file", str(progress)]
        if self.nice and shutil.which("nice"):
            cmd = ["nice", "-n", str(self.nice), *cmd]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.trainer_env}
        log_path = logs / f"round-{round_:06d}.log"
        with open(log_path, "ab") as err, tempfile.TemporaryFile() as out:
            # Its own session: a terminal's Ctrl-C reaches the driver only, which then stops it in order.
            self.proc = proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                                start_new_session=True)
            self.state["trainer_pid"] = proc.pid
            self.save()
            try:
                seen = None
                while proc.poll() is None:
                    if self.stop_event.wait(0.5):
                        self._terminate(proc)
                        raise Stopped()
                    seen = self._show_progress(progress, seen)
            finally:
                if proc.poll() is None:
                    self._terminate(proc)
                self.proc = None
                self.state.pop("trainer_pid", None)
            out.seek(0)
            lines = [ln for ln in out.read().decode(errors="replace").splitlines() if ln.strip().startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
        return {"status": "failed", "round": round_,
                "reason": f"trainer exited with {proc.returncode}: " + (" | ".join(tail)[-500:] or "no output")}

    def _show_progress(self, path: Path, seen: float | None) -> float | None:
        """Copy the trainer's live progress (phase, step of total, loss, tokens/s, ETA) into the
        state the dashboard reads, when it changed."""
        try:
            mtime = path.stat().st_mtime
            if mtime == seen:
                return seen
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return seen
        cur = self.state.get("current_round")
        if isinstance(cur, dict) and isinstance(doc, dict):
            cur["progress"] = {k: doc.get(k) for k in ("phase", "step", "of", "loss", "tokens_per_s", "eta_s")}
            losses = cur.setdefault("losses", [])
            if doc.get("step") and doc["step"] != cur.get("loss_step") and isinstance(doc.get("loss"), (int, float)):
                cur["loss_step"] = doc["step"]
                losses.append(doc["loss"])
                if len(losses) > MAX_LOSS_POINTS:  # a long round: keep every other point
                    del losses[::2]
            self.save()
        return mtime

    def _terminate(self, proc: subprocess.Popen, grace: float = 15) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def swap(self, uri: str | None) -> None:
        """Point serving at `uri` and wait until the replica answers with it."""
        self.state["phase"] = "swapping"
        self.save()
        if self.server is not None:
            self.server.update_checkpoint(self.user_config(uri))
            self.server.wait_for_checkpoint(checkpoint_id(uri) if uri else self._base_id(), timeout=self.swap_timeout)
        self.state["serving"], self.state["serving_id"] = uri, checkpoint_id(uri) or self._base_id()
        self.state["served_at"] = time.time()

    def _base_id(self) -> str:
        # What serving reports for the base model (not the status' current id, which before the
        # swap is still the checkpoint being replaced).
        return f"base:{self.config.spec.base_model}"

    def run_round(self, round_: int) -> dict[str, Any]:
        """Train, decide, promote and swap; returns the round's record."""
        parent = self.state.get("promoted")
        self.state["phase"], self.state["current_round"] = "training", {"round": round_, "started_at": time.time(),
                                                                         "parent": parent}
        self.save()
        self.on_event("training", {"round": round_, "parent": parent})
        result = self.train(round_, parent)
        manifest = None
        if result.get("status") == "published":
            try:
                manifest = self.store.manifest(self.store.ref_for_uri(result["checkpoint"]))
            except (CheckpointError, ValueError) as err:
                result = {"status": "failed", "round": round_, "reason": f"published checkpoint unreadable: {err}"}
        self.state["phase"] = "evaluating"
        self.state, action = apply_result(self.state, result, manifest, self.config.spec.promotion)
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
            self._terminate(self.proc)
        try:
            remove_incomplete(self.store, self.config.name)
        except Exception as err:  # the store went away: it cannot hold debris we could delete
            log.warning("could not clean incomplete checkpoints: %s", err)
        shutil.rmtree(self.data_dir / "tmp", ignore_errors=True)
        self.state["current_round"] = None
        self.state.pop("trainer_pid", None)
        self.state["phase"] = "stopped"
        self.save()


def web_dir() -> Path:
    return Path(__file__).resolve().parent / "web"


def start_serving(driver: LocalDriver, *, port: int, host: str = "127.0.0.1", serving: str | None = None,
                  app_args: dict[str, Any] | None = None):
    """Start Ray Serve with the chat app on `serving` (None: the base model), the dashboard beside it."""
    from .serving.app import start_local

    args = {"state_file": str(driver.state_path), "dashboard_dir": str(web_dir()), **(app_args or {})}
    fb = driver.config.spec.feedback
    if fb is not None:
        # /feedback writes where the run's feedback source reads.
        args.setdefault("feedback_uri", fb.uri or feedback_uri(driver.config.spec.storage.uri, driver.config.name))
    server = start_local(port=port, host=host, user_config=driver.user_config(serving), args=args)
    driver.server = server
    st = server.status()
    driver.state["serving"], driver.state["serving_id"] = serving, checkpoint_id(serving) or st.get("checkpoint")
    driver.save()
    return server


def stop_serving(server: Any) -> None:
    """Shut down Serve and the local Ray this process started (no orphan raylets)."""
    import ray

    try:
        if server is not None:
            server.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
