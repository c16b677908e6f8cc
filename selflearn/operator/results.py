"""Reading what the cluster says: a Job's state, a round's result, a RayService's readiness. Pure.

The trainer writes its result (selflearn.contracts.RoundResult) as one JSON line to the
termination message file. With `terminationMessagePolicy: FallbackToLogsOnError` a crashed
trainer leaves its log tail there instead, so the parser takes the last line that is a JSON
object with a `status`, and otherwise reports the tail's last line as the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..contracts import ResultError, RoundMetrics, RoundResult, checkpoint_id_of_uri, result_line
from .resources import LABEL_ATTEMPT, LABEL_ROUND, TRAINER_CONTAINER

ACTIVE, SUCCEEDED, FAILED = "active", "succeeded", "failed"


@dataclass(frozen=True)
class JobView:
    name: str
    round: int
    attempt: int
    state: str  # active | succeeded | failed
    message: str = ""


def _true(conditions: Iterable[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == kind and c.get("status") == "True"), None)


def job_state(job_spec: Mapping[str, Any], job_status: Mapping[str, Any]) -> tuple[str, str]:
    """(state, message) of a batch/v1 Job from its conditions, else its pod counts."""
    conditions = job_status.get("conditions") or []
    if _true(conditions, "Complete"):
        return SUCCEEDED, ""
    if failed := _true(conditions, "Failed"):
        return FAILED, " ".join(x for x in (failed.get("reason"), failed.get("message")) if x)
    if (job_status.get("succeeded") or 0) >= (job_spec.get("completions") or 1):
        return SUCCEEDED, ""
    if (job_status.get("failed") or 0) > (job_spec.get("backoffLimit", 6)):
        return FAILED, "BackoffLimitExceeded"
    return ACTIVE, ""


def job_view(*, name: str, labels: Mapping[str, str], spec: Mapping[str, Any],
             status: Mapping[str, Any]) -> JobView:
    state, message = job_state(spec, status)
    return JobView(name=name, round=int(labels.get(LABEL_ROUND, 0)), attempt=int(labels.get(LABEL_ATTEMPT, 1)),
                   state=state, message=message)


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER_CONTAINER:
            return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
    return None


def pod_belongs_to(pod: Mapping[str, Any], job: str) -> bool:
    meta = pod.get("metadata") or {}
    lbl = meta.get("labels") or {}
    if lbl.get("batch.kubernetes.io/job-name") == job or lbl.get("job-name") == job:
        return True
    return any(o.get("kind") == "Job" and o.get("name") == job for o in meta.get("ownerReferences") or [])


# Why a pod's container cannot start; the Job stays active (and would until its deadline) meanwhile.
STUCK_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                           "CreateContainerConfigError", "CreateContainerError"})


def stuck_reason(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """'<reason>: <message>' of the trainer container when it is waiting for something that will not
    come by itself (a bad image tag, a missing Secret), else None."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if cs.get("name") == TRAINER_CONTAINER and waiting.get("reason") in STUCK_REASONS:
                return f"{waiting['reason']}: {waiting.get('message') or 'no message'}"
    return None


def termination_message(pods: Iterable[Mapping[str, Any]], *, succeeded: bool,
                        first_failure: bool = False) -> str | None:
    """The trainer container's termination message from the newest pod that ended as asked (exit
    code 0 for a succeeded Job, non-zero for a failed one); with `first_failure`, of a failed
    distributed round the pod that failed first: its rank's failure is the cause, the others'
    ranks only lost it."""
    best: tuple[str, str] | None = None
    for pod in pods:
        term = _terminated(pod)
        if not term or (term.get("exitCode") == 0) != succeeded:
            continue
        key = term.get("finishedAt") or ""
        if best is None or (key < best[0] if first_failure and not succeeded else key >= best[0]):
            best = (key, term.get("message") or "")
    return best[1] if best else None


def parse_result(message: str | None, *, round_: int) -> RoundResult:
    """Parse the trainer's result line for round `round_`; raise ResultError saying what is wrong."""
    return RoundResult.from_line(message, round_=round_)


def failure_reason(job_message: str, pod_message: str | None) -> str:
    """Why a Job failed, in one line: the trainer's own reason if it wrote one, else its log tail."""
    detail = ""
    if pod_message and pod_message.strip():
        doc = result_line(pod_message)
        detail = str(doc.get("reason") or "") if doc else pod_message.strip().splitlines()[-1].strip()
    parts = [p for p in (job_message, detail) if p]
    return ("; ".join(parts) or "the trainer Job failed")[:400]


def result_from_manifest(manifest: Mapping[str, Any], *, round_: int, checkpoint: str) -> RoundResult:
    """A published round's result rebuilt from its checkpoint manifest (when the pod is gone)."""
    metrics = manifest.get("metrics")
    if not isinstance(metrics, dict):
        raise ResultError(f"the manifest of {checkpoint} has no metrics")
    return RoundResult("published", round_, checkpoint=checkpoint,
                       metrics=RoundMetrics.parse(metrics, what=f"the metrics in {checkpoint}'s manifest").summary(),
                       id=checkpoint_id_of_uri(checkpoint), parent=manifest.get("parent"))


def rayservice_ready(status: Mapping[str, Any] | None) -> tuple[bool, str]:
    """(ready, message) from a KubeRay RayService status (v1.3+ conditions, else serviceStatus)."""
    status = status or {}
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True", c.get("message") or c.get("reason") or ""
    if status.get("serviceStatus"):
        return status["serviceStatus"] == "Running", f"serviceStatus {status['serviceStatus']}"
    return False, "KubeRay has not reported on the RayService yet"
