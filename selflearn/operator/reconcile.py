"""One reconciliation of one LearnerRun: the timer's body (see handlers.py for the wiring).

Each tick keeps serving in step with the status (a pin, a RayService that drifted), follows the
round in flight (its Job, its pods, its result line, the promotion decision) or starts the next
one, and writes the conditions. Decisions are the pure functions of scheduling.py and
selflearn.policy; this module reads the cluster and edits the typed status (status.py) through
`StatusWriter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
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
from .status import ConditionType, LearnerRunStatus, StoredStatus, iso


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


def namespaced(namespace: str | None) -> str:
    """A LearnerRun's namespace: the CRD is namespaced, so Kopf always passes one."""
    if namespace is None:
        raise kopf.PermanentError("a LearnerRun without a namespace")
    return namespace


class StatusWriter:
    """The run's status during one handler call: `status` is the typed working copy; on leaving the
    `with` block, what changed goes into Kopf's patch (Kopf applies it once the handler returns)."""

    def __init__(self, stored: Mapping[str, Any] | None, patch: kopf.Patch):
        self._stored = StoredStatus.read(stored)
        self._patch = patch

    @property
    def status(self) -> LearnerRunStatus:
        return self._stored.status

    @property
    def refused(self) -> str | None:
        """Why the stored round progress cannot be read (see status.py); None when it can."""
        return self._stored.refused

    @property
    def dropped(self) -> tuple[str, ...]:
        """What could not be read and is removed with this write, a line each."""
        return self._stored.dropped

    def condition(self, type_: ConditionType, status: bool, reason: str, message: str,
                  generation: int | None) -> None:
        self.status.conditions = sched.set_condition(self.status.conditions, type_=type_, status=status,
                                                     reason=reason, message=message, now=utcnow(),
                                                     generation=generation)

    def __enter__(self) -> StatusWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        # Also after an error: what the handler learned before it (a finished round) must not be lost.
        for key, value in self._stored.changes().items():
            self._patch.status[key] = value


@dataclass
class Reconciliation:
    """One reconciliation of one LearnerRun (the timer's body, split into steps)."""

    body: kopf.Body
    spec: LearnerRunSpec
    memo: kopf.Memo
    logger: kopf.Logger
    writer: StatusWriter
    jobs: list[JobView]  # the run's trainer Jobs, from the index
    serving: ServingView | None  # its RayService, from the index
    # Derived from the above once per tick:
    name: str = field(init=False)
    namespace: str = field(init=False)
    kube: Kube = field(init=False)
    config: OperatorConfig = field(init=False)
    status: LearnerRunStatus = field(init=False)  # the writer's typed working copy
    secret_missing: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.name, self.namespace = self.body.metadata.name, namespaced(self.body.metadata.namespace)
        self.kube, self.config, self.status = self.memo.kube, self.memo.config, self.writer.status

    async def tick(self) -> None:
        if self.writer.refused:
            self.refuse(self.writer.refused)
            return
        if self.writer.dropped:
            kopf.warn(self.body, reason="StatusRepaired", message="removed from the status, unreadable: "
                      + "; ".join(self.writer.dropped))
        await self.keep_serving_in_step()
        if self.status.active_job:
            await self.follow_active_job(self.status.active_job)
        if not self.status.active_job:
            await self.maybe_start_round()
        self.write_conditions()

    def refuse(self, why: str) -> None:
        """Nothing acts on progress it cannot read: say so, and wait for the status to be fixed."""
        s = self.status
        if s.message != why:
            kopf.warn(self.body, reason="StatusUnreadable", message=why)
        s.phase, s.message = "Failed", why
        self.writer.condition("Degraded", True, "StatusUnreadable", why, self.body.meta.get("generation"))

    # serving ---------------------------------------------------------------------------------------
    async def serve(self, checkpoint: str | None) -> None:
        """Point the model deployment's user_config at `checkpoint`; KubeRay applies it in place."""
        if self.spec.serving.replicas == 0:
            return
        body = {"spec": {"serveConfigV2": res.render_serve_config(spec=self.spec, checkpoint=checkpoint, run=self.name)}}
        if await self.kube.patch("ray.io/v1", "rayservices", self.namespace, res.rayservice_name(self.name), body) is None:
            self.logger.warning("the RayService is missing; it is recreated on the next spec change or restart")

    async def keep_serving_in_step(self) -> None:
        s = self.status
        current = s.serving_checkpoint
        # With no candidate, the gate's only word is a pin that does not serve yet.
        target = switch_to(decide(self.spec, None, candidate=None, serving=current), current)
        if target is not None:
            await self.serve(target)
            s.serving_checkpoint = target
            normal_event(self.body, "Pinned", f"serving the pinned checkpoint {target}")
        elif self.serving is not None and self.serving.has_checkpoint and self.serving.checkpoint != current:
            self.logger.info(f"the RayService serves {self.serving.checkpoint}, not {current}; correcting it")
            await self.serve(current)

    # a round in flight --------------------------------------------------------------------------------
    async def follow_active_job(self, name: str) -> None:
        s = self.status
        job = next((j for j in self.jobs if j.name == name), None)
        if job is None:  # not indexed yet (just created), or deleted behind our back
            raw = await self.kube.get("batch/v1", "jobs", self.namespace, name)
            if raw is None:
                await self.round_failed(name, s.round, s.failures + 1, f"Job {name} disappeared before it finished")
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
            if stuck and s.message != message:
                kopf.warn(self.body, reason="TrainerCannotStart", message=message)
            s.phase, s.message = "Training", message + ("; suspended after it" if self.spec.suspend else "")
            return
        said = termination_message(pods, succeeded=job.state == SUCCEEDED,
                                   first_failure=self.spec.trainer.workers > 1)
        if job.state != SUCCEEDED:
            await self.round_failed(job.name, job.round, job.attempt, failure_reason(job.message, said))
            return
        try:
            result = parse_result(said, round_=job.round)
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
        s, now = self.status, utcnow()
        serving, decision = s.serving_checkpoint, None
        if result.status == "published":
            decision = decide(self.spec, result.metrics, candidate=result.checkpoint, serving=serving)
            if (target := switch_to(decision, serving)) is not None:
                await self.serve(target)
                serving = target
        row = sched.finished_row(job=job, now=now, result=result, decision=decision)
        s.set_progress(sched.after_round(s.progress, spec=self.spec, now=now, serving=serving))
        s.record(row, keep=self.config.history_limit)
        normal_event(self.body, sched.event_reason(row.result), f"round {job.round}: {row.reason}")

    async def round_failed(self, job: str, round_: int, attempt: int, reason: str) -> None:
        s, now = self.status, utcnow()
        progress = sched.after_failure(s.progress, now=now, base=self.config.retry_base_seconds,
                                       cap=self.config.retry_max_seconds)
        row = sched.failed_row(round_=round_, attempt=attempt, job=job, now=now, reason=reason)
        s.set_progress(progress)
        s.record(row, keep=self.config.history_limit)
        retry = iso(progress.next_round_at) if progress.next_round_at else "now"
        kopf.warn(self.body, reason=sched.event_reason(row.result),
                  message=f"round {round_} attempt {attempt} failed: {reason}; retrying after {retry}")

    async def prune_jobs(self) -> None:
        finished = sorted((j for j in self.jobs if j.state != ACTIVE), key=lambda j: (j.round, j.attempt))
        for job in finished[:max(0, len(finished) - self.config.keep_jobs)]:
            await self.kube.delete("batch/v1", "jobs", self.namespace, job.name)

    # the next round -------------------------------------------------------------------------------------
    async def maybe_start_round(self) -> None:
        s = self.status
        progress = s.progress
        step = sched.next_round(self.spec, progress, utcnow())
        if isinstance(step, sched.Wait):
            s.phase, s.message = step.phase, step.message
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
                if s.message != message:
                    kopf.warn(self.body, reason="SecretMissing", message=message)
                s.phase, s.message = "Failed", message
                self.secret_missing = message
                return
        owner = kopf.build_owner_reference(self.body)
        await self.kube.apply("v1", "configmaps", self.namespace, res.build_run_configmap(
            run=self.name, namespace=self.namespace, owner=owner, spec=self.spec))
        job = res.build_trainer_job(run=self.name, namespace=self.namespace, owner=owner, spec=self.spec,
                                    round_=step.round, attempt=step.attempt, parent=progress.serving_checkpoint)
        job_name = res.job_name(self.name, step.round, step.attempt)
        created = await self.kube.create("batch/v1", "jobs", self.namespace, job)
        if created is None:
            # 409: a previous operator (or replica) created it before it could record so. Adopt it,
            # unless it belongs to an earlier LearnerRun of the same name that is still being deleted.
            existing = await self.kube.get("batch/v1", "jobs", self.namespace, job_name) or {}
            owners = {o.get("uid") for o in (existing.get("metadata") or {}).get("ownerReferences") or []}
            if self.body.metadata.uid not in owners:
                raise kopf.TemporaryError(f"Job {job_name} belongs to an earlier LearnerRun; waiting for it to go",
                                          delay=10)
            self.logger.info(f"Job {job_name} exists already; adopting it")
        else:
            parent = progress.serving_checkpoint or "the base model"
            normal_event(self.body, "RoundStarted",
                         f"round {step.round} (attempt {step.attempt}) started: Job {job_name}, from {parent}")
        if self.spec.trainer.workers > 1:
            # The pods' names (<job>-<index>.<job>) for the ranks to meet; owned by the Job, so it goes
            # with it. Made after the Job, whose uid it needs: the ranks retry until the names resolve.
            await self.kube.create("v1", "services", self.namespace, res.build_trainer_service(
                run=self.name, namespace=self.namespace, job=created or existing))
        s.round, s.active_job = step.round, job_name
        s.phase, s.message = "Training", f"round {step.round} is training (Job {job_name})"

    # conditions --------------------------------------------------------------------------------------------
    def write_conditions(self) -> None:
        gen = self.body.meta.get("generation")
        s, w = self.status, self.writer
        active = s.active_job
        w.condition("TrainerRunning", bool(active), "RoundRunning" if active else "Idle",
                    f"round {s.round}: Job {active}" if active else "no round is running", gen)
        if self.secret_missing:
            w.condition("Degraded", True, "SecretMissing", self.secret_missing, gen)
        elif s.failures:
            last = s.history[-1].reason if s.history else ""
            w.condition("Degraded", True, "RoundFailed", f"round {s.round} failed {s.failures}x: {last}", gen)
        else:
            w.condition("Degraded", False, "AsExpected", "", gen)
        serving = s.serving_checkpoint or f"the base model {self.spec.base_model}"
        if self.spec.serving.replicas == 0:
            w.condition("Ready", False, "ServingDisabled", "serving.replicas is 0", gen)
        elif self.serving is None:
            w.condition("Ready", False, "ServingNotCreated", "the RayService does not exist (yet)", gen)
        elif self.serving.ready:
            w.condition("Ready", True, "ServingReady", f"serving {serving}", gen)
        else:
            w.condition("Ready", False, "ServingNotReady", self.serving.message, gen)
