"""The local run's state on disk: `<data-dir>/local-state.json`, written by the driver and read by
the dashboard (GET /api/rounds) and `selflearn status`, possibly from another process.

Its name says whose it is: the trainer keeps a `state.json` of its own in the store (the sources'
cursors, `<run>/state.json`). A data dir from before the rename has `<data-dir>/state.json`; it is
read once, written under the new name and removed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ..store_backends import FileBackend
from ..validation import one_line
from .state import STATE_VERSION, LocalState, new_state

if TYPE_CHECKING:
    from ..spec import RunConfig

STATE_FILE = "local-state.json"
OLD_STATE_FILE = "state.json"  # its name until local mode's and the trainer's state files were told apart


def parse_state(text: str, path: Path) -> LocalState:
    """The state document in `text` (read from `path`); ValueError (one line) when it is not one."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"state file {path} is not valid JSON ({err}); move it away to start afresh") from None
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise ValueError(f"state file {path} is not a selflearn local state (version {STATE_VERSION})")
    try:
        return LocalState.model_validate(doc)
    except ValidationError as err:
        raise ValueError(f"state file {path} is malformed: {one_line(err.errors()[:1])}") from None


def _existing(data_dir: Path) -> Path | None:
    for name in (STATE_FILE, OLD_STATE_FILE):
        if (data_dir / name).exists():
            return data_dir / name
    return None


def load_state(data_dir: Path, config: RunConfig) -> LocalState:
    """The driver's state of run `config` in `data_dir`: a fresh one if there is no file; ValueError
    if the file is torn or belongs to another run or store (never silently start over on someone's
    data). A state under the old name is moved to the new one."""
    path = _existing(data_dir)
    if path is None:
        return new_state(config)
    state = parse_state(path.read_text(), path)
    if state.run != config.name or state.store != config.spec.storage.uri:
        raise ValueError(f"state file {path} belongs to run {state.run!r} on {state.store}, not "
                         f"{config.name!r} on {config.spec.storage.uri}; use another --data-dir")
    if path.name == OLD_STATE_FILE:
        save_state(data_dir / STATE_FILE, state)
        path.unlink()
    return state


def save_state(path: Path, state: LocalState) -> None:
    """Write-then-rename (as the store writes a manifest): the dashboard and `selflearn status`
    never read a torn file."""
    path = Path(path)
    # Not NaN or Infinity (JSON has neither; the dashboard's JSON.parse would fail): pydantic writes null.
    text = state.model_copy(update={"updated_at": time.time()}).model_dump_json(indent=1)
    FileBackend(path.parent).put_bytes(path.name, text.encode())


def read_state(data_dir: str | Path) -> LocalState | None:
    """The state in `data_dir`, for display (no run to check it against); None: no run here."""
    path = _existing(Path(data_dir))
    if path is None:
        return None
    try:
        return parse_state(path.read_text(), path)
    except FileNotFoundError:  # the driver moved it from the old name meanwhile
        return read_state(data_dir)
