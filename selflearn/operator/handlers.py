"""Kopf wiring for LearnerRun: thin handlers that read the cluster, call the pure builders
(resources.py) and decisions (scheduling.py, selflearn.policy), and write status through `patch`.

- create / update / resume: validate the spec (a bad one: status Failed, an Event, PermanentError),
  apply the RayService and Ingress, honour a pin, record observedGeneration.
- a timer per LearnerRun (the only writer of round progress): starts the next round's Job when one
  is due, reads a finished Job's result, applies the promotion policy, patches the RayService.
- indexes over trainer Jobs and RayServices, so a tick costs no API call while a round trains.
- delete: checkpoints are removed only with `storage.deleteOnRemoval` (children go by ownerReferences).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import kopf

from ..policy import decide, decide_for
from ..spec import RUN_NAME_RE, LearnerRunSpec, parse_spec
from . import resources as res
from . import scheduling as sched
from . import storage
from .crd import GROUP, PLURAL, VERSION
from .kube import ExistenceCache, Kube, KubeError
from .results import (ACTIVE, SUCCEEDED, JobView, ResultError, RoundResult, failure_reason, job_view,
                      parse_result, pod_belongs_to, rayservice_ready, stuck_reason,
                      termination_message)

LR = (GROUP, VERSION, PLURAL)
# Kopf holds deletion until the run's timer has stopped (and, with deleteOnRemoval, storage is gone).
FINALIZER = "selflearn.dev/operator"


@dataclass(frozen=True)
class OperatorConfig:
    tick_seconds: float = 10.0  # how often each LearnerRun is reconciled
    retry_base_seconds: float = 30.0  # first backoff after a failed round; doubles per failure
    retry_max_seconds: float = 3600.0
    history_limit: int = 20  # rows kept in status.history
    keep_jobs: int = 3  # finished trainer Jobs kept per run (for their logs)


@dataclass(frozen=True)
class IndexedJob:
    view: JobView
    owner_uid: str | None


@dataclass(frozen=True)
class ServingView:
    has_checkpoint: bool
    checkpoint: str | None
    ready: bool
    message: str


def _normal(body: kopf.Body, reason: str, message: str) -> None:
    # kopf.info() obeys settings.posting.level (WARNING here, to keep handler chatter out of Events).
    kopf.event(body, type="Normal", reason=reason, message=message)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def validate(name: str, spec: Mapping[str, Any]) -> LearnerRunSpec:
    """The spec as the trainer will see it; ValueError with a one-line message otherwise."""
    if not RUN_NAME_RE.match(name):
        raise ValueError(f"invalid LearnerRun: metadata.name {name!r} must be lowercase alphanumerics and '-', "
                         "at most 40 characters (it prefixes Job and checkpoint names)")
    return parse_spec(dict(spec))


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
                                                   reason=reason, message=message, now=_now(),
                                                   generation=generation))


# -- activities --------------------------------------------------------------------------------------
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    memo.connection = memo.connection.reload()
    return memo.connection.kopf_info()


async def startup(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    memo.kube = Kube(memo.connection)
    memo.secrets = ExistenceCache(ttl=memo.config.tick_seconds)
    logger.info(f"selflearn operator: reconciling every {memo.config.tick_seconds}s against {memo.connection.server}")


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.kube.close()


# -- indexes -----------------------------------------------------------------------------------------
def index_trainer_job(name: str, namespace: str, labels: kopf.Labels, meta: kopf.Meta, spec: kopf.Spec,
                      status: kopf.Status, **_: Any) -> dict[tuple[str, str], IndexedJob]:
    owner = next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("kind") == "LearnerRun"), None)
    view = job_view(name=name, labels=labels, spec=spec, status=status)
    return {(namespace, labels[res.LABEL_RUN]): IndexedJob(view, owner)}


def index_rayservice(namespace: str, labels: kopf.Labels, spec: kopf.Spec, status: kopf.Status,
                     **_: Any) -> dict[tuple[str, str], ServingView]:
    found, checkpoint = res.served_checkpoint(spec.get("serveConfigV2"))
    ready, message = rayservice_ready(status)
    return {(namespace, labels[res.LABEL_RUN]): ServingView(found, checkpoint, ready, message)}


# -- spec: create / update / resume -------------------------------------------------------------------
async def apply_spec(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, name: str,
                     namespace: str, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
                     reason: str, **_: Any) -> None:
    generation = meta.get("generation")
    try:
        run_spec = validate(name, spec)
    except ValueError as err:
        writer = StatusWriter(status, patch)
        writer.update({"phase": "Failed", "message": str(err), "observedGeneration": generation})
        writer.condition("Degraded", True, "InvalidSpec", str(err), generation)
        writer.condition("Ready", False, "InvalidSpec", "the spec is invalid", generation)
        kopf.warn(body, reason="InvalidSpec", message=str(err))
        raise kopf.PermanentError(str(err)) from None

    kube: Kube = memo.kube
    owner = res.owner_reference(run=name, uid=meta["uid"])
    pin = run_spec.promotion.pinned_checkpoint
    serving = pin or status.get("servingCheckpoint")
    if run_spec.serving.replicas > 0:
        try:
            await kube.apply("ray.io/v1", "rayservices", namespace, res.build_rayservice(
                run=name, namespace=namespace, owner=owner, spec=run_spec, checkpoint=serving))
        except KubeError as err:
            if err.status != 404:
                raise
            kopf.warn(body, reason="NoKubeRay", message=f"cannot create the RayService ({err}); is KubeRay installed?")
        await kube.apply("networking.k8s.io/v1", "ingresses", namespace,
                         res.build_ingress(run=name, namespace=namespace, owner=owner, spec=run_spec))
    else:
        await kube.delete("ray.io/v1", "rayservices", namespace, res.rayservice_name(name))
        await kube.delete("networking.k8s.io/v1", "ingresses", namespace, res.ingress_name(name))

    writer = StatusWriter(status, patch)
    if pin and pin != status.get("servingCheckpoint"):
        writer.set("servingCheckpoint", pin)
        _normal(body, "Pinned", f"serving the pinned checkpoint {pin}")
    # Phase and conditions are the timer's (it runs within a tick and clears an earlier Failed).
    writer.set("observedGeneration", generation)
    if reason == "create" and run_spec.storage.uri.startswith("file://"):
        kopf.warn(body, reason="LocalStorage",
                  message="storage.uri is file://: each pod has its own filesystem; use s3:// on Kubernetes")


async def remove_storage(spec: kopf.Spec, name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger,
                         **_: Any) -> None:
    try:
        run_spec = validate(name, spec)
    except ValueError:
        return  # it never ran
    try:
        where = await storage.delete_run(memo.kube, spec=run_spec, run=name, namespace=namespace)
    except ValueError as err:  # the Secret is gone: retrying cannot help
        raise kopf.PermanentError(f"checkpoints were NOT deleted: {err}") from None
    logger.info(f"deleted the checkpoints at {where}")


def _deletes_storage(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("storage") or {}).get("deleteOnRemoval"))


# -- the round loop ---------------------------------------------------------------------------------------
async def reconcile(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, name: str,
                    namespace: str, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
                    trainer_jobs: kopf.Index, rayservices: kopf.Index, **_: Any) -> None:
    try:
        run_spec = validate(name, spec)
    except ValueError:
        return  # apply_spec has set Failed and said why
    jobs = [j.view for j in trainer_jobs.get((namespace, name), []) if j.owner_uid in (None, meta["uid"])]
    run = Reconciliation(body=body, spec=run_spec, name=name, namespace=namespace, meta=meta, memo=memo,
                         logger=logger, writer=StatusWriter(status, patch), jobs=jobs,
                         serving=next(iter(rayservices.get((namespace, name), [])), None))
    await run.keep_serving_in_step()
    if run.writer.get("activeJob"):
        await run.follow_active_job()
    if not run.writer.get("activeJob"):
        await run.maybe_start_round()
    run.write_conditions()


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
            decision = decide(None, candidate=None, max_general_increase=0, max_fresh_increase=0,
                              pinned=pin, serving=current)
            await self.serve(decision.serve)
            self.writer.set("servingCheckpoint", decision.serve)
            _normal(self.body, "Pinned", f"serving the pinned checkpoint {pin}")
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
        now, serving, decision = _now(), self.writer.get("servingCheckpoint"), None
        if result.status == "published":
            p = self.spec.promotion
            decision = decide_for(p, result.metrics, candidate=result.checkpoint, serving=serving)
            if decision.serve and decision.serve != serving:
                await self.serve(decision.serve)
                serving = decision.serve
        entry = sched.history_entry(round_=job.round, attempt=job.attempt, job=job.name, now=now,
                                    result=result, decision=decision)
        self.writer.update(sched.after_round(spec=self.spec, now=now, result=result, serving=serving))
        self.writer.set("history", sched.append_history(self.writer.get("history"), entry, self.config.history_limit))
        reason = {"promoted": "Promoted", "rejected": "NotPromoted", "pinned": "NotPromoted",
                  "empty": "EmptyRound"}[entry["result"]]
        _normal(self.body, reason, f"round {job.round}: {entry['reason']}")

    async def round_failed(self, job: str, round_: int, attempt: int, reason: str) -> None:
        now = _now()
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
        step = sched.next_round(self.spec, progress, _now())
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
        owner = res.owner_reference(run=self.name, uid=self.meta["uid"])
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
            _normal(self.body, "RoundStarted", f"round {step.round} (attempt {step.attempt}) started: "
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


# -- registration --------------------------------------------------------------------------------------------
def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """A fresh registry with every handler (tests and the CLI each build their own)."""
    registry = kopf.OperatorRegistry()
    managed = {"app.kubernetes.io/managed-by": res.MANAGED_BY, res.LABEL_RUN: kopf.PRESENT}
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.index("batch", "v1", "jobs", labels=managed, id="trainer_jobs", registry=registry)(index_trainer_job)
    kopf.index("ray.io", "v1", "rayservices", labels=managed, id="rayservices", registry=registry)(index_rayservice)
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(*LR, id="apply_spec", registry=registry)(apply_spec)
    kopf.on.delete(*LR, id="remove_storage", when=_deletes_storage, retries=5, backoff=10,
                   registry=registry)(remove_storage)
    kopf.timer(*LR, id="reconcile", interval=config.tick_seconds, registry=registry)(reconcile)
    return registry


def make_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.selflearn.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.selflearn.dev", key="last-handled-configuration")
    # Events come from explicit kopf.event/warn calls; handler log lines below WARNING stay in the log.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = res.MANAGED_BY
    return settings
