"""The local run's state on disk: `<data-dir>/state.json`, written by the driver and read by the
dashboard (GET /api/rounds) and `selflearn status`, possibly from another process."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .state import STATE_VERSION, new_state

if TYPE_CHECKING:
    from ..spec import RunConfig

STATE_FILE = "state.json"


def load_state(path: Path, config: RunConfig) -> dict[str, Any]:
    """The driver's state of run `config`: a fresh one if there is no file; ValueError if the file
    is torn or belongs to another run or store (never silently start over on someone's data)."""
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


def read_state(data_dir: str | Path) -> dict[str, Any] | None:
    """The state document as it is, for display (no run to check it against); None: no run here."""
    path = Path(data_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"state file {path} is not valid JSON: {err}") from None
