"""What start-up (and shutdown) makes of the store: the store, not the state file, is the source
of truth, so a driver that died between publishing a checkpoint and recording it loses nothing,
and a round directory it left half-uploaded is removed."""

from __future__ import annotations

from typing import Any

from ..checkpoints import CheckpointError, CheckpointStore
from ..contracts import RoundResult
from ..spec import PromotionSpec
from .state import Action, apply_result


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
        # What the trainer's result line would have carried: no loss curve (round_record reads it from the manifest).
        metrics = {k: v for k, v in (manifest.get("metrics") or {}).items() if k != "losses"}
        result = RoundResult("published", ref.round, checkpoint=ref.uri, id=ref.id, parent=manifest.get("parent"),
                             metrics=metrics)
        state, action = apply_result(state, result, manifest, promotion)
        last = action if action.serve else last
    return state, last


def remove_incomplete(store: CheckpointStore, run: str) -> list[str]:
    """Delete round directories without a manifest (an interrupted upload); returns their names."""
    return store.remove_incomplete(run)
