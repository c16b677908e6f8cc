"""The LearnerRun status as the operator reads it back: what it writes, what it drops, what it refuses.

Pure: `StoredStatus` on documents as the API server would hand them over (tests/test_operator.py
drives the same paths through the emulator).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from selflearn.operator import scheduling as sched
from selflearn.operator.status import StoredStatus

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
ROW = {"round": 2, "attempt": 1, "job": "wiki-r2", "result": "rejected", "promoted": False,
       "checkpoint": "s3://ckpt/runs/wiki/r000002", "perplexityBefore": 19.0, "perplexityAfter": 21.0,
       "reason": "rejected: general ppl 19.00->21.00", "finishedAt": "2026-05-01T11:50:00.000000Z"}
READY = {"type": "Ready", "status": "True", "reason": "ServingReady", "message": "serving r1",
         "lastTransitionTime": "2026-05-01T11:00:00Z", "observedGeneration": 3}
# A status as this operator writes it (timestamps in both forms the API server may hand back).
WRITTEN: dict[str, Any] = {
    "phase": "Serving", "message": "round 3 starts at 2026-05-01T12:00:00.000000Z", "round": 2, "activeJob": None,
    "failures": 0, "nextRoundAt": "2026-05-01T12:00:00.000000Z", "servingCheckpoint": "s3://ckpt/runs/wiki/r000001",
    "lastPerplexity": 21.0, "observedGeneration": 3, "history": [ROW], "conditions": [READY],
}


def test_a_status_read_back_unchanged_patches_nothing():
    """Every tick reads the status and writes it back: a field that round-trips differently would be
    an API write per run per tick."""
    stored = StoredStatus.read(WRITTEN)
    s = stored.status
    assert (s.round, s.serving_checkpoint, s.history[0].result, s.conditions[0].type) == (
        2, "s3://ckpt/runs/wiki/r000001", "rejected", "Ready")
    s.set_progress(replace(s.progress))  # the same values, assigned
    s.conditions = sched.set_condition(s.conditions, type_="Ready", status=True, reason="ServingReady",
                                       message="serving r1", now=NOW, generation=3)
    assert stored.changes() == {}
    assert not stored.dropped and stored.refused is None


def test_what_changed_is_patched_by_its_manifest_name_and_null_clears_a_field():
    stored = StoredStatus.read(WRITTEN | {"activeJob": "wiki-r3", "round": 3, "phase": "Training"})
    s = stored.status
    s.set_progress(sched.after_round(s.progress, spec=_spec(), now=NOW, serving="s3://ckpt/runs/wiki/r000003"))
    s.phase = "Serving"
    assert stored.changes() == {"activeJob": None, "nextRoundAt": "2026-05-01T12:10:00.000000Z", "phase": "Serving",
                                "servingCheckpoint": "s3://ckpt/runs/wiki/r000003"}


def test_a_new_runs_status_stays_empty_until_the_operator_says_something():
    stored = StoredStatus.read(None)
    stored.status.phase = "Pending"
    assert stored.changes() == {"phase": "Pending"}  # not round 0, failures 0, history [] ...


def test_rows_and_fields_an_older_operator_wrote_are_dropped_and_removed_on_the_next_write():
    old_row = ROW | {"round": 1, "result": "skipped"}  # a result this operator does not know
    stored = StoredStatus.read(WRITTEN | {
        "phase": "Running", "history": [old_row, ROW], "lastPerplexity": "n/a", "kopf": {"dummy": "x"},
        "conditions": [READY, {"type": "Progressing", "status": "True"}]})
    s = stored.status
    assert [h.round for h in s.history] == [2] and [c.type for c in s.conditions] == ["Ready"]
    assert stored.refused is None
    assert any(line.startswith("status.history.0.result:") and "'skipped'" in line for line in stored.dropped)
    assert any(line.startswith("status.phase:") for line in stored.dropped), stored.dropped
    # Without another change, the next write removes them (Kopf's own field is left alone).
    assert stored.changes() == {"phase": None, "lastPerplexity": None, "history": [ROW],
                                "conditions": [READY | {"lastTransitionTime": "2026-05-01T11:00:00.000000Z"}]}


def test_progress_it_cannot_read_is_refused_naming_the_field_and_left_for_a_person():
    stored = StoredStatus.read(WRITTEN | {"round": "three", "history": [ROW | {"result": "skipped"}]})
    assert stored.refused is not None
    assert stored.refused.startswith("status.round: Input should be a valid integer")
    assert "'three'" in stored.refused and "kubectl patch" in stored.refused and "\n" not in stored.refused
    assert "round" not in stored.changes()  # the bad value stays where a person can see it


def test_a_time_without_a_zone_is_read_as_utc():
    s = StoredStatus.read({"nextRoundAt": "2026-05-01T12:00:00"}).status
    assert s.next_round_at == NOW
    assert sched.next_round(_spec(), s.progress, NOW) == sched.Start(1, 1)


def _spec():
    from selflearn.spec import parse_spec

    return parse_spec({"schedule": {"intervalSeconds": 600}})
