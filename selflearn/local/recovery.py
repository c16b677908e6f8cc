"""What start-up (and shutdown) makes of the store: the store, not the state file, is the source
of truth, so a driver that died between publishing a checkpoint and recording it loses nothing,
and a round directory it left half-uploaded is removed."""

from __future__ import annotations

import logging

from ..checkpoints import CheckpointError, CheckpointStore
from ..contracts import ResultError, RoundResult
from ..spec import LearnerRunSpec
from .records import RoundManifest
from .state import Action, LocalState, apply_result

log = logging.getLogger(__name__)


def reconcile(state: LocalState, store: CheckpointStore, spec: LearnerRunSpec) -> tuple[LocalState, Action | None]:
    """Record checkpoints the store holds but the state does not (the driver died between publish
    and record), deciding on each from its manifest's metrics, oldest first."""
    known = {r.round for r in state.rounds if r.status == "published"}
    last: Action | None = None
    for ref in store.list(state.run):
        if ref.round in known or ref.round <= state.round:
            continue  # recorded already: nothing to decide
        try:
            manifest = RoundManifest.parse(store.manifest(ref), what=f"{ref.id}'s manifest")
        except CheckpointError:
            continue
        except ResultError as err:
            log.warning("not recording %s: %s", ref.id, err)
            continue
        # What the trainer's result line would have carried: no loss curve (the record reads it from the manifest).
        result = RoundResult("published", ref.round, checkpoint=ref.uri, id=ref.id, parent=manifest.parent,
                             metrics=manifest.metrics.summary())
        state, action = apply_result(state, result, manifest, spec)
        last = action if action.serve else last
    return state, last


def remove_incomplete(store: CheckpointStore, run: str) -> list[str]:
    """Delete round directories without a manifest (an interrupted upload); returns their names."""
    return store.remove_incomplete(run)
