"""Test support: published checkpoints whose manifest was changed afterwards, as a flipped byte in
the store or a hostile manifest would leave them (for the start-up and loading checks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from selflearn.checkpoints import CheckpointStore


def tampered_checkpoint(workdir: Path, model_dir: str, edit: Callable[[dict], None]) -> str:
    """A checkpoint `run/r000001` published under `workdir/store` from a copy of `model_dir`, whose
    manifest `edit` then changes in place; its uri."""
    src = workdir / "model"
    shutil.copytree(model_dir, src)
    ref = CheckpointStore.from_uri(f"file://{workdir / 'store'}").publish("run", 1, src, {"base_model": model_dir})
    manifest = workdir / "store" / "run" / "r000001" / "manifest.json"
    doc = json.loads(manifest.read_text())
    edit(doc)
    manifest.write_text(json.dumps(doc))
    return ref.uri


def wrong_sha256(doc: dict) -> None:
    doc["files"]["model.safetensors"]["sha256"] = "0" * 64


def traversal(doc: dict) -> None:
    doc["files"] = {"../../../../etc/passwd": {"sha256": "0" * 64, "size": 1}, **doc["files"]}
