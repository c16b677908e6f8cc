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
from .reconcile import OperatorConfig, Reconciliation, ServingView, StatusWriter, namespaced, normal_event
from .results import JobView, job_view, rayservice_ready

# What Kopf's decorators take to name a resource: the LearnerRun CRD's group, version and plural.
LEARNERRUN_RESOURCE = (GROUP, VERSION, PLURAL)
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


async def startup(memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    memo.kube = Kube(memo.connection)
    memo.secrets = ExistenceCache(ttl=memo.config.tick_seconds)
    logger.info(f"selflearn operator: reconciling every {memo.config.tick_seconds}s against {memo.connection.server}")


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.kube.close()


# -- indexes -----------------------------------------------------------------------------------------
def index_trainer_job(name: str, namespace: str | None, labels: kopf.Labels, meta: kopf.Meta, spec: kopf.Spec,
                      status: kopf.Status, **_: Any) -> dict[tuple[str | None, str], IndexedJob]:
    owner = next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("kind") == "LearnerRun"), None)
    view = job_view(name=name, labels=labels, spec=spec, status=status)
    return {(namespace, labels[res.LABEL_RUN]): IndexedJob(view, owner)}


def index_rayservice(namespace: str | None, labels: kopf.Labels, spec: kopf.Spec, status: kopf.Status,
                     **_: Any) -> dict[tuple[str | None, str], ServingView]:
    found, checkpoint = res.served_checkpoint(spec.get("serveConfigV2"))
    ready, message = rayservice_ready(status)
    return {(namespace, labels[res.LABEL_RUN]): ServingView(found, checkpoint, ready, message)}


# -- spec: create / update / resume -------------------------------------------------------------------
async def apply_spec(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                     reason: str, **_: Any) -> None:
    name, generation = body.metadata.name, body.meta.get("generation")
    with StatusWriter(status, patch) as writer:
        s = writer.status
        try:
            run_spec = validate(name, spec)
        except ValueError as err:
            s.phase, s.message, s.observed_generation = "Failed", str(err), generation
            writer.condition("Degraded", True, "InvalidSpec", str(err), generation)
            writer.condition("Ready", False, "InvalidSpec", "the spec is invalid", generation)
            kopf.warn(body, reason="InvalidSpec", message=str(err))
            raise kopf.PermanentError(str(err)) from None
        if writer.refused:  # the timer says so in the status; the RayService waits for what serves
            raise kopf.TemporaryError(writer.refused, delay=60)
        await _apply_children(body, namespaced(body.metadata.namespace), run_spec, memo.kube, s.serving_checkpoint)
        pin = run_spec.promotion.pinned_checkpoint
        if pin and pin != s.serving_checkpoint:
            s.serving_checkpoint = pin
            normal_event(body, "Pinned", f"serving the pinned checkpoint {pin}")
        # Phase and conditions are the timer's (it runs within a tick and clears an earlier Failed).
        s.observed_generation = generation
    if reason == "create" and run_spec.storage.uri.startswith("file://"):
        kopf.warn(body, reason="LocalStorage",
                  message="storage.uri is file://: each pod has its own filesystem; use s3:// on Kubernetes")


async def _apply_children(body: kopf.Body, namespace: str, spec: LearnerRunSpec, kube: Kube,
                          serving: str | None) -> None:
    """The RayService (serving the pin, else `serving`) and the Ingress; both removed at 0 replicas."""
    name, owner = body.metadata.name, kopf.build_owner_reference(body)
    if spec.serving.replicas == 0:
        await kube.delete("ray.io/v1", "rayservices", namespace, res.rayservice_name(name))
        await kube.delete("networking.k8s.io/v1", "ingresses", namespace, res.ingress_name(name))
        return
    try:
        await kube.apply("ray.io/v1", "rayservices", namespace, res.build_rayservice(
            run=name, namespace=namespace, owner=owner, spec=spec,
            checkpoint=spec.promotion.pinned_checkpoint or serving))
    except KubeError as err:
        if err.status != 404:
            raise
        kopf.warn(body, reason="NoKubeRay", message=f"cannot create the RayService ({err}); is KubeRay installed?")
    await kube.apply("networking.k8s.io/v1", "ingresses", namespace,
                     res.build_ingress(run=name, namespace=namespace, owner=owner, spec=spec))


async def remove_storage(spec: kopf.Spec, name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger,
                         **_: Any) -> None:
    try:
        run_spec = validate(name, spec)
    except ValueError:
        return  # it never ran
    try:
        where = await storage.delete_run(memo.kube, spec=run_spec, run=name, namespace=namespaced(namespace))
    except ValueError as err:  # the Secret is gone: retrying cannot help
        raise kopf.PermanentError(f"checkpoints were NOT deleted: {err}") from None
    logger.info(f"deleted the checkpoints at {where}")


def _deletes_storage(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("storage") or {}).get("deleteOnRemoval"))


# -- the round loop ---------------------------------------------------------------------------------------
async def reconcile(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                    logger: kopf.Logger, trainer_jobs: kopf.Index[tuple[str | None, str], IndexedJob],
                    rayservices: kopf.Index[tuple[str | None, str], ServingView], **_: Any) -> None:
    m = body.metadata
    try:
        run_spec = validate(m.name, spec)
    except ValueError:
        return  # apply_spec has set Failed and said why
    key = (m.namespace, m.name)
    jobs = [j.view for j in trainer_jobs.get(key, []) if j.owner_uid in (None, m.uid)]
    with StatusWriter(status, patch) as writer:
        await Reconciliation(body=body, spec=run_spec, memo=memo, logger=logger, writer=writer, jobs=jobs,
                             serving=next(iter(rayservices.get(key, [])), None)).tick()


# -- registration --------------------------------------------------------------------------------------------
def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """A fresh registry with every handler (tests and the CLI each build their own)."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    for group, plural, id_, index in (("batch", "jobs", "trainer_jobs", index_trainer_job),
                                      ("ray.io", "rayservices", "rayservices", index_rayservice)):
        kopf.index(group, "v1", plural, id=id_, registry=registry,
                   labels={"app.kubernetes.io/managed-by": res.MANAGED_BY, res.LABEL_RUN: kopf.PRESENT})(index)
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(*LEARNERRUN_RESOURCE, id="apply_spec", registry=registry)(apply_spec)
    kopf.on.delete(*LEARNERRUN_RESOURCE, id="remove_storage", when=_deletes_storage, retries=5, backoff=10,
                   registry=registry)(remove_storage)
    # Kopf passes each index as the keyword of its id, which its handler protocols cannot declare.
    kopf.timer(*LEARNERRUN_RESOURCE, id="reconcile", interval=config.tick_seconds,
               registry=registry)(reconcile)  # type: ignore[arg-type]
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
