"""One training round as a `selflearn train` subprocess: its command line, its live progress, its
result, and how to stop it.

The trainer runs niced in its own session (a terminal's Ctrl-C reaches the driver only, which then
stops it in order) and prints its `RoundResult` as the last JSON line of its stdout; its log goes
to `<data-dir>/logs/round-NNNNNN.log`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from ..contracts import ResultError, RoundResult
from .state import MAX_LOSS_POINTS

PROGRESS_FIELDS = ("phase", "step", "of", "loss", "tokens_per_s", "eta_s")


def trainer_command(python: str, run_config: Path, round_: int, parent: str | None, workdir: Path,
                    progress: Path, nice: int) -> list[str]:
    """`python -m selflearn.trainer ...` for round `round_` from `parent` (None: the base model)."""
    cmd = [python, "-m", "selflearn.trainer", "--run-config", str(run_config),
           "--round", str(round_), "--parent", parent or "base", "--workdir", str(workdir), "--no-progress",
           "--progress-file", str(progress)]
    if nice and shutil.which("nice"):
        cmd = ["nice", "-n", str(nice), *cmd]
    return cmd


def round_log(logs: Path, round_: int) -> Path:
    return logs / f"round-{round_:06d}.log"


def read_result(returncode: int, stdout: str, log_path: Path, round_: int) -> RoundResult:
    """The trainer's result line when it exited cleanly, else a failed result quoting its log's tail."""
    if returncode == 0:
        try:
            return RoundResult.from_line(stdout)
        except ResultError:
            pass  # exited 0 without a result line: a failure like any other
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
    return RoundResult("failed", round_,
                       reason=f"trainer exited with {returncode}: " + (" | ".join(tail)[-500:] or "no output"))


def read_progress(path: Path, seen: float | None) -> tuple[float | None, dict[str, Any] | None]:
    """The progress file's mtime and document when it changed since `seen`, else (`seen`, None)."""
    try:
        mtime = path.stat().st_mtime
        if mtime == seen:
            return seen, None
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return seen, None
    return mtime, doc if isinstance(doc, dict) else None


def merge_progress(current: dict[str, Any], doc: dict[str, Any]) -> None:
    """Copy the trainer's progress (phase, step of total, loss, tokens/s, ETA) into the running
    round's record, and each new step's loss into its live loss curve."""
    current["progress"] = {k: doc.get(k) for k in PROGRESS_FIELDS}
    losses = current.setdefault("losses", [])
    if doc.get("step") and doc["step"] != current.get("loss_step") and isinstance(doc.get("loss"), (int, float)):
        current["loss_step"] = doc["step"]
        losses.append(doc["loss"])
        if len(losses) > MAX_LOSS_POINTS:  # a long round: keep every other point
            del losses[::2]


def terminate(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the trainer's process group, SIGKILL it if it is still there after `grace` seconds."""
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
