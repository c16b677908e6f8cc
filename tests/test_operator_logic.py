"""The operator's pure decisions: when rounds start, how failures back off, how results are read."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from selflearn.checkpoints import CheckpointStore
from selflearn.contracts import RoundMetrics
from selflearn.operator import scheduling as sched, storage
from selflearn.operator.results import (FAILED, SUCCEEDED, JobView, ResultError, RoundResult, failure_reason,
                                        job_state, parse_result, termination_message)
from selflearn.operator.status import LearnerRunStatus, Progress
from selflearn.policy import decide
from selflearn.spec import parse_spec

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
RESULT = {"status": "published", "round": 3, "checkpoint": "s3://b/p/wiki/r000003", "id": "wiki/r000003",
          "parent": "s3://b/p/wiki/r000002",
          "metrics": {"train_loss": 2.2, "ppl": {"general": {"before": 20.0, "after": 19.5}}}}


def progress(**kw) -> Progress:
    return Progress(**kw)


def test_rounds_wait_for_the_interval_the_round_limit_and_suspension():
    spec = parse_spec({"schedule": {"intervalSeconds": 600, "maxRounds": 3}})
    assert sched.next_round(spec, progress(), NOW) == sched.Start(1, 1)
    later = progress(round=2, next_round_at=NOW + timedelta(seconds=30))
    wait = sched.next_round(spec, later, NOW)
    assert isinstance(wait, sched.Wait) and wait.phase == "Serving" and "round 3 starts at 2026-05-01T12:00:30" in wait.message
    assert sched.next_round(spec, later, NOW + timedelta(seconds=30)) == sched.Start(3, 1)
    done = sched.next_round(spec, progress(round=3), NOW)
    assert isinstance(done, sched.Wait) and done.reason == "MaxRoundsReached"
    suspended = parse_spec({"suspend": True})
    assert sched.next_round(suspended, progress(round=1), NOW).phase == "Suspended"


def test_a_failed_round_is_retried_as_the_same_round_after_a_growing_capped_backoff():
    spec = parse_spec({})
    p = progress(round=4, active_job="run-r4")
    delays = []
    for _ in range(8):
        p = sched.after_failure(p, now=NOW, base=30, cap=600)
        assert (p.round, p.active_job) == (4, None)
        delays.append((p.next_round_at - NOW).total_seconds())
        assert sched.next_round(spec, p, NOW).phase == "Retrying"
        assert sched.next_round(spec, p, p.next_round_at) == sched.Start(4, p.failures + 1)
    assert delays == [30, 60, 120, 240, 480, 600, 600, 600]


def test_history_keeps_the_newest_rows_only():
    status = LearnerRunStatus()
    for r in range(1, 31):
        status.record(sched.failed_row(round_=r, attempt=1, job=f"run-r{r}", now=NOW, reason="x"), keep=20)
    assert [h.round for h in status.history] == list(range(11, 31))


def test_the_result_line_is_found_in_a_noisy_termination_message():
    message = "INFO selflearn.trainer: published\n" + json.dumps(RESULT) + "\n"
    result = parse_result(message, round_=3)
    general = result.metrics.ppl_pair("general")
    assert (result.status, result.checkpoint, general.before, general.after) == ("published", RESULT["checkpoint"],
                                                                                  20.0, 19.5)
    assert parse_result(json.dumps({"status": "empty", "round": 3, "reason": "no new articles"}), round_=3).reason \
        == "no new articles"


@pytest.mark.parametrize("message,why", [
    ("", "no termination message"),
    (json.dumps(RESULT), "for round 3, expected 4"),  # a stale result must not be promoted as round 4
    (json.dumps({**RESULT, "round": 4, "metrics": None}), "no metrics"),
    # Figures of the wrong type are refused where they are read, not when the gate divides by them.
    (json.dumps({**RESULT, "round": 4, "metrics": {"ppl": {"general": {"before": "twenty", "after": 19.0}}}}),
     r"metrics are malformed: ppl.general.before"),
    ("Killed", "last line: 'Killed'"),
])
def test_an_unusable_result_says_what_is_wrong(message: str, why: str):
    with pytest.raises(ResultError, match=why):
        parse_result(message, round_=4)


def test_a_crashed_trainers_log_tail_becomes_the_failure_reason():
    tail = "Traceback (most recent call last):\n  File ...\ntorch.OutOfMemoryError: CUDA out of memory."
    assert failure_reason("BackoffLimitExceeded", tail) == "BackoffLimitExceeded; torch.OutOfMemoryError: CUDA out of memory."
    own = json.dumps({"status": "failed", "round": 2, "reason": "storage.uri s3://x is not reachable"})
    assert failure_reason("", own) == "storage.uri s3://x is not reachable"


def _pod(exit_code: int, message: str, finished: str) -> dict:
    return {"status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
        "exitCode": exit_code, "message": message, "finishedAt": finished}}}]}}


def test_the_result_comes_from_the_pod_that_succeeded_not_an_earlier_failed_try():
    pods = [_pod(0, "good", "2026-05-01T12:05:00Z"), _pod(137, "OOMKilled", "2026-05-01T12:01:00Z")]
    assert termination_message(pods, succeeded=True) == "good"
    assert termination_message(pods, succeeded=False) == "OOMKilled"


def test_job_state_follows_the_job_controllers_conditions():
    assert job_state({}, {"active": 1})[0] == "active"
    assert job_state({}, {"conditions": [{"type": "Complete", "status": "True"}]})[0] == SUCCEEDED
    state, message = job_state({"backoffLimit": 2}, {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer"}]})
    assert (state, message) == (FAILED, "DeadlineExceeded Job was active longer")


def test_a_published_rounds_result_is_rebuilt_from_its_manifest_when_the_pod_is_gone(tmp_path: Path):
    store = CheckpointStore.from_uri(f"file://{tmp_path}")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(b"weights")
    store.publish("wiki", 3, tmp_path / "src", {"metrics": RESULT["metrics"]})
    spec = parse_spec({"storage": {"uri": f"file://{tmp_path}"}})
    result = asyncio.run(storage.manifest_result(None, spec=spec, run="wiki", namespace="default", round_=3))
    general = result.metrics.ppl_pair("general")
    assert (result.checkpoint, general.before, general.after) == (f"file://{tmp_path}/wiki/r000003", 20.0, 19.5)
    with pytest.raises(ResultError, match="no manifest for round 4"):
        asyncio.run(storage.manifest_result(None, spec=spec, run="wiki", namespace="default", round_=4))


def test_history_shows_what_a_chat_user_would_notice():
    metrics = RoundMetrics.parse({"ppl": {"general": {"before": 20.0, "after": 19.0}}, "held_out": 0,
                                  "knowledge": {"learned": {"before": 0.2, "after": 0.4}, "asked": {"learned": 3}},
                                  "chat": {"retention": 0.97, "format_ok": {"before": 1.0, "after": 1.0}}})
    result = RoundResult("published", 3, "s3://b/p/run/r000003", metrics)
    decision = decide(parse_spec({}), metrics, candidate=result.checkpoint)
    status = LearnerRunStatus()
    status.record(sched.finished_row(job=JobView("run-r3", 3, 1, SUCCEEDED), now=NOW, result=result,
                                     decision=decision), keep=20)
    # A round without chat metrics (chatEval off) has none of those fields, rather than nulls.
    status.record(sched.finished_row(job=JobView("run-r4", 4, 1, SUCCEEDED), now=NOW,
                                     result=RoundResult("published", 4, "s3://b/p/run/r000004",
                                                        RoundMetrics(ppl=metrics.ppl)),
                                     decision=decision), keep=20)
    entry, plain = status.stored()["history"]  # the JSON the LearnerRun holds
    assert entry["result"] == "promoted" and entry["knowledgeBefore"] == 0.2 and entry["knowledgeAfter"] == 0.4
    assert entry["chatRetention"] == 0.97 and entry["formatHealth"] == 1.0
    assert entry["finishedAt"] == "2026-05-01T12:00:00.000000Z" and entry["perplexityAfter"] == 19.0
    assert "chatRetention" not in plain and "knowledgeAfter" not in plain
    assert status.stored()["lastPerplexity"] == 19.0
