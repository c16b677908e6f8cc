"""One reconciliation of one LearnerRun: the timer's body (see handlers.py for the wiring).

Each tick keeps serving in step with the status (a pin, a RayService that drifted), follows the
round in flight (its Job, its pods, its result line, the promotion decision) or starts the next
one, and writes the conditions. Decisions are the pure functions of scheduling.py and
selflearn.policy; this module reads the cluster and writes status through `StatusWriter`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import kopf

from ..contracts import ResultError, RoundResult
from ..policy import decide, switch_to
from ..spec import LearnerRunSpec
from . import resources as res
from . import scheduling as sched
from . import storage
from .kube import Kube, KubeError
from .results import (ACTIVE, SUCCEEDED, JobView, failure_reason, job_view, parse_result, pod_belongs_to,
                      stuck_reason, termination_message)


@dataclass(frozen=True)
class OperatorConfig:
    tick_seconds: float = 10.0  # how often each LearnerRun is reconciled
    retry_base_seconds: float = 30.0  # first backoff after a failed round; doubles per failure
    retry_max_seconds: float = 3600.0
    history_limit: int = 20  # rows kept in status.history
    keep_jobs: int = 3  # finished trainer Jobs kept per run (for their logs)


@dataclass(frozen=True)
class ServingView:
    has_checkpoint: bool
    checkpoint: str | None
    ready: bool
    message: str


def normal_event(body: kopf.Body, reason: str, message: str) -> None:
    # kopf.info() obeys settings.posting.level (WARNING here, to keep handler chatter out of Events).
    kopf.event(body, type="Normal", reason=reason, message=message)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class StatusWriter:
    """Writes only the status fields that change; `current` is the status as it will be."""

    def __init__(self, status: Mapping[str, Any], patch: kopf.Patch):
        self.current = dict(status)
        self._patch = patch

    def get(self, key: str, default: Any = None) -> Any:
        return self.current.get(key, default)

    def set(self, key: str, value: Any) -> None:
        if self.current.get(key) != value:
            self._patch.status[key] = value
            self.current[key] = value

    def update(self, fields: Mapping[str, Any]) -> None:
        for k, v in fields.items():
            self.set(k, v)

    def condition(self, type_: str, status: bool, reason: str, message: str, generation: int | None) -> None:
        current = sched.condition(self.current.get("conditions"), type_)
        want = ("True" if status else "False", reason, message)
        if current and (current.get("status"), current.get("reason"), current.get("message")) == want:
            return
        self.set("conditions", sched.set_condition(self.current.get("conditions"), type_=type_, status=status,
                                                   reason=reason, message=message, now=utcnow(),
                                                   generation=generation))


@dataclass
class Reconciliation:
    """One reconciliation of one LearnerRun (the timer's body, split into steps)."""

    body: kopf.Body
    spec: LearnerRunSpec
    name: str
    namespace: str
    meta: kopf.Meta
    memo: kopf.Memo
    logger: logging.Logger
    writer: StatusWriter
    jobs: list[JobView]
    serving: ServingView | None
    secret_missing: str | None = None

    @property
    def kube(self) -> Kube:
        return self.memo.kube

    @property
    def config(self) -> OperatorConfig:
        return self.memo.config

    @property
    def progress(self) -> sched.Progress:
        return sched.Progress.from_status(self.writer.current)

    # serving ---------------------------------------------------------------------------------------
    async def serve(self, checkpoint: str | None) -> None:
        """Point the model deployment's user_config at `checkpoint`; KubeRay applies it in place."""
        if self.spec.serving.replicas == 0:
            return
        body = {"spec": {"serveConfigV2": res.render_serve_config(spec=self.spec, checkpoint=checkpoint, run=self.name)}}
        if await self.kube.patch("ray.io/v1", "rayservices", self.namespace, res.rayservice_name(self.name), body) is None:
            self.logger.warning("the RayService is missing; it is recreated on the next spec change or restart")

    async def keep_serving_in_step(self) -> None:
        pin = self.spec.promotion.pinned_checkpoint
        current = self.writer.get("servingCheckpoint")
        if pin and pin != current:
            decision = decide(self.spec, None, candidate=None, serving=current)
            await self.serve(decision.serve)
            self.writer.set("servingCheckpoint", decision.serve)
            normal_event(self.body, "Pinned", f"serving the pinned checkpoint {pin}")
        elif self.serving is not None and self.serving.has_checkpoint and self.serving.checkpoint != current:
            self.logger.info(f"the RayService serves {self.serving.checkpoint}, not {current}; correcting it")
            await self.serve(current)

    # a round in flight --------------------------------------------------------------------------------
    async def follow_active_job(self) -> None:
        name = self.writer.get("activeJob")
        job = next((j for j in self.jobs if j.name == name), None)
        if job is None:  # not indexed yet (just created), or deleted behind our back
            raw = await self.kube.get("batch/v1", "jobs", self.namespace, name)
            if raw is None:
                await self.round_failed(name, self.progress.round, self.progress.failures + 1,
                                        f"Job {name} disappeared before it finished")
                return
            m = raw.get("metadata") or {}
            job = job_view(name=name, labels=m.get("labels") or {}, spec=raw.get("spec") or {},
                           status=raw.get("status") or {})
        pods = [p for p in await self.kube.list("v1", "pods", self.namespace,
                                                label_selector=f"batch.kubernetes.io/job-name={job.name}")
                if pod_belongs_to(p, job.name)]
        if job.state == ACTIVE:
            stuck = stuck_reason(pods)
            message = (f"round {job.round} cannot start (Job {job.name}): {stuck}" if stuck else
                       f"round {job.round} is training (Job {job.name})")
            if stuck and self.writer.get("message") != message:
                kopf.warn(self.body, reason="TrainerCannotStart", message=message)
            self.writer.update({"phase": "Training",
                                "message": message + ("; suspended after it" if self.spec.suspend else "")})
            return
        message = termination_message(pods, succeeded=job.state == SUCCEEDED)
        if job.state != SUCCEEDED:
            await self.round_failed(job.name, job.round, job.attempt, failure_reason(job.message, message))
            return
        try:
            result = parse_result(message, round_=job.round)
        except ResultError as err:
            try:  # the pod may be gone; a published checkpoint's manifest carries the same metrics
                result = await storage.manifest_result(self.kube, spec=self.spec, run=self.name,
                                                       namespace=self.namespace, round_=job.round)
            except ResultError:
                await self.round_failed(job.name, job.round, job.attempt, f"the result cannot be read: {err}")
                return
        if result.status == "failed":
            await self.round_failed(job.name, job.round, job.attempt, result.reason or "the trainer failed")
            return
        await self.round_succeeded(job, result)
        await self.prune_jobs()

    async def round_succeeded(self, job: JobView, result: RoundResult) -> None:
        now, serving, decision = utcnow(), self.writer.get("servingCheckpoint"), None
        if result.status == "published":
            decision = decide(self.spec, result.metrics, candidate=result.checkpoint, serving=serving)
            if (target := switch_to(decision, serving)) is not None:
                await self.serve(target)
                serving = target
        entry = sched.history_entry(round_=job.round, attempt=job.attempt, job=job.name, now=now,
                                    result=result, decision=decision)
        self.writer.update(sched.after_round(spec=self.spec, now=now, result=result, serving=serving))
        self.writer.set("history", sched.append_history(self.writer.get("history"), entry, self.config.history_limit))
        normal_event(self.body, sched.EVENT_REASON[entry["result"]], f"round {job.round}: {entry['reason']}")

    async def round_failed(self, job: str, round_: int, attempt: int, reason: str) -> None:
        now = utcnow()
        fields = sched.after_failure(progress=self.progress, now=now, base=self.config.retry_base_seconds,
                                     cap=self.config.retry_max_seconds)
        entry = sched.history_entry(round_=round_, attempt=attempt, job=job, now=now, result=None,
                                    decision=None, failure=reason)
        self.writer.update(fields)
        self.writer.set("history", sched.append_history(self.writer.get("history"), entry, self.config.history_limit))
        kopf.warn(self.body, reason="RoundFailed",
                  message=f"round {round_} attempt {attempt} failed: {reason}; retrying after {fields['nextRoundAt']}")

    async def prune_jobs(self) -> None:
        finished = sorted((j for j in self.jobs if j.state != ACTIVE), key=lambda j: (j.round, j.attempt))
        for job in finished[:max(0, len(finished) - self.config.keep_jobs)]:
            await self.kube.delete("batch/v1", "jobs", self.namespace, job.name)

    # the next round -------------------------------------------------------------------------------------
    async def maybe_start_round(self) -> None:
        progress = self.progress
        step = sched.next_round(self.spec, progress, utcnow())
        if isinstance(step, sched.Wait):
            self.writer.update({"phase": step.phase, "message": step.message})
            return
        if secret := self.spec.storage.credentials_secret:
            try:
                found = await self.memo.secrets.exists(self.kube, "v1", "secrets", self.namespace, secret)
            except KubeError as err:
                if err.status != 403:
                    raise
                found = True  # not allowed to look (rbac.readSecrets=false): the trainer pod will tell
            if not found:
                message = storage.missing_secret_message(secret, self.namespace)
                if self.writer.get("message") != message:
                    kopf.warn(self.body, reason="SecretMissing", message=message)
                self.writer.update({"phase": "Failed", "message": message})
                self.secret_missing = message
                return
        owner = kopf.build_owner_reference(self.body)
        await self.kube.apply("v1", "configmaps", self.namespace, res.build_run_configmap(
            run=self.name, namespace=self.namespace, owner=owner, spec=self.spec))
        job = res.build_trainer_job(run=self.name, namespace=self.namespace, owner=owner, spec=self.spec,
                                    round_=step.round, attempt=step.attempt, parent=progress.serving)
        job_name = job["metadata"]["name"]
        if await self.kube.create("batch/v1", "jobs", self.namespace, job) is None:
            # 409: a previous operator (or replica) created it before it could record so. Adopt it,
            # unless it belongs to an earlier LearnerRun of the same name that is still being deleted.
            existing = await self.kube.get("batch/v1", "jobs", self.namespace, job_name) or {}
            owners = {o.get("uid") for o in (existing.get("metadata") or {}).get("ownerReferences") or []}
            if self.meta["uid"] not in owners:
                raise kopf.TemporaryError(f"Job {job_name} belongs to an earlier LearnerRun; waiting for it to go",
                                          delay=10)
            self.logger.info(f"Job {job_name} exists already; adopting it")
        else:
            normal_event(self.body, "RoundStarted", f"round {step.round} (attempt {step.attempt}) started: "
                                               f"Job {job_name}, from {progress.serving or 'the base model'}")
        self.writer.update({"round": step.round, "activeJob": job_name, "phase": "Training",
                            "message": f"round {step.round} is training (Job {job_name})"})

    # conditions --------------------------------------------------------------------------------------------
    def write_conditions(self) -> None:
        gen = self.meta.get("generation")
        w = self.writer
        active = w.get("activeJob")
        w.condition("TrainerRunning", bool(active), "RoundRunning" if active else "Idle",
                    f"round {w.get('round')}: Job {active}" if active else "no round is running", gen)
        if self.secret_missing:
            w.condition("Degraded", True, "SecretMissing", self.secret_missing, gen)
        elif w.get("failures"):
            last = (w.get("history") or [{}])[-1]
            w.condition("Degraded", True, "RoundFailed",
                        f"round {w.get('round')} failed {w.get('failures')}x: {last.get('reason', '')}", gen)
        else:
            w.condition("Degraded", False, "AsExpected", "", gen)
        serving = w.get("servingCheckpoint") or f"the base model {self.spec.base_model}"
        if self.spec.serving.replicas == 0:
            w.condition("Ready", False, "ServingDisabled", "serving.replicas is 0", gen)
        elif self.serving is None:
            w.condition("Ready", False, "ServingNotCreated", "the RayService does not exist (yet)", gen)
        elif self.serving.ready:
            w.condition("Ready", True, "ServingReady", f"serving {serving}", gen)
        else:
            w.condition("Ready", False, "ServingNotReady", self.serving.message, gen)
