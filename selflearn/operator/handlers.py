"""Kopf wiring for LearnerRun: thin handlers that read the cluster, call the pure builders
(resources.py) and decisions (scheduling.py, selflearn.policy), and write status through `patch`.

- create / update / resume: validate the spec (a bad one: status Failed, an Event, PermanentError),
  apply the RayService and Ingress, honour a pin, record observedGeneration.
- a timer per LearnerRun (the only writer of round progress; its body is reconcile.py): starts the
  next round's Job when one is due, reads a finished Job's result, applies the promotion policy,
  patches the RayService.
- indexes over trainer Jobs and RayServices, so a tick costs no API call while a round trains.
- delete: checkpoints are removed only with `storage.deleteOnRemoval` (children go by ownerReferences).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import kopf

from ..spec import RUN_NAME_RE, LearnerRunSpec, parse_spec
from . import resources as res
from . import storage
from .crd import GROUP, PLURAL, VERSION
from .kube import ExistenceCache, Kube, KubeError
from .reconcile import OperatorConfig, Reconciliation, ServingView, StatusWriter, normal_event
from .results import JobView, job_view, rayservice_ready

LR = (GROUP, VERSION, PLURAL)
# Kopf holds deletion until the run's timer has stopped (and, with deleteOnRemoval, storage is gone).
FINALIZER = "selflearn.dev/operator"


@dataclass(frozen=True)
class IndexedJob:
    view: JobView
    owner_uid: str | None


def validate(name: str, spec: Mapping[str, Any]) -> LearnerRunSpec:
    """The spec as the trainer will see it; ValueError with a one-line message otherwise."""
    if not RUN_NAME_RE.match(name):
        raise ValueError(f"invalid LearnerRun: metadata.name {name!r} must be lowercase alphanumerics and '-', "
                         "at most 40 characters (it prefixes Job and checkpoint names)")
    return parse_spec(dict(spec))


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
    owner = kopf.build_owner_reference(body)
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
        normal_event(body, "Pinned", f"serving the pinned checkpoint {pin}")
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
