"""One training round as a `selflearn train` subprocess: its command line, its live progress, its
result, and how to stop it.

The trainer runs niced in its own session (a terminal's Ctrl-C reaches the driver only, which then
stops it in order) and prints its `RoundResult` as the last JSON line of its stdout; its log goes
to `<data-dir>/logs/round-NNNNNN.log`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ..contracts import ResultError, RoundProgress, RoundResult


@dataclass(frozen=True)
class TrainerOptions:
    """How the trainer subprocess runs: its interpreter, niceness and extra environment."""

    nice: int = 10
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    procs: int = 1  # ranks of each round (`selflearn train --procs`): one per GPU of a multi-GPU host

    def __post_init__(self) -> None:
        if self.procs < 1:
            raise ValueError(f"--train-procs must be at least 1, got {self.procs}")


def trainer_command(opts: TrainerOptions, run_config: Path, round_: int, parent: str | None, workdir: Path,
                    progress: Path) -> list[str]:
    """`python -m selflearn.trainer ...` for round `round_` from `parent` (None: the base model)."""
    cmd = [opts.python, "-m", "selflearn.trainer", "--run-config", str(run_config),
           "--round", str(round_), "--parent", parent or "base", "--workdir", str(workdir), "--no-progress",
           "--progress-file", str(progress)]
    if opts.procs > 1:
        cmd += ["--procs", str(opts.procs)]
    if opts.nice and shutil.which("nice"):
        cmd = ["nice", "-n", str(opts.nice), *cmd]
    return cmd


def round_log(logs: Path, round_: int) -> Path:
    return logs / f"round-{round_:06d}.log"


def read_result(returncode: int, stdout: str, log_path: Path, round_: int) -> RoundResult:
    """The trainer's result line when it exited cleanly or said why it failed (a distributed round
    names the rank), else a failed result quoting its log's tail."""
    try:
        said = RoundResult.from_line(stdout)
        if returncode == 0 or said.status == "failed":
            return said
    except ResultError:
        pass  # no result line: a failure like any other
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
    return RoundResult("failed", round_,
                       reason=f"trainer exited with {returncode}: " + (" | ".join(tail)[-500:] or "no output"))


def read_progress(path: Path, seen: float | None) -> tuple[float | None, RoundProgress | None]:
    """The progress file's mtime and document when it changed since `seen`, else (`seen`, None).
    A file being replaced or not yet written reads as unchanged (the next poll sees it)."""
    try:
        mtime = path.stat().st_mtime
        if mtime == seen:
            return seen, None
        return mtime, RoundProgress.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return seen, None


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
