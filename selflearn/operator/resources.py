"""Pure, keyword-only manifest builders: a LearnerRun's children as plain dicts.

Nothing here talks to a cluster. Tests validate every output against the real Kubernetes schemas
(`kubernetes-validate --strict`) and KubeRay's RayService CRD.

Contracts with the other parts of selflearn:
- the trainer Job runs `selflearn train --run-config /etc/selflearn/run.yaml --round N --parent <uri|base>`
  and writes its result as one JSON line to /dev/termination-log (selflearn.contracts);
- the RayService runs `selflearn.serving.app:app_builder`; the `ChatModel` deployment's user_config
  carries the checkpoint, so promotion is a patch that KubeRay applies in place (reconfigure()).

`owner` is the LearnerRun's owner reference (`kopf.build_owner_reference`): children are
garbage-collected with their run.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from ..contracts import TERMINATION_LOG
from ..feedback import feedback_uri
from ..serving import deployment
from ..spec import LearnerRunSpec

LABEL_RUN = "selflearn.dev/run"
LABEL_ROUND = "selflearn.dev/round"
LABEL_ATTEMPT = "selflearn.dev/attempt"
ANNOTATION_PARENT = "selflearn.dev/parent"
MANAGED_BY = "selflearn-operator"

TRAINER_CONTAINER = "trainer"
RUN_CONFIG_DIR = "/etc/selflearn"
RUN_CONFIG_KEY = "run.yaml"
# Where spec.trainer.cacheVolumeClaim is mounted, and the image's user and group (Dockerfile.trainer):
# fsGroup makes a fresh volume writable by them.
TRAINER_CACHE_DIR = "/var/cache/selflearn"
TRAINER_UID = 10001
# `selflearn train` exits 2 for a bad run config: retrying the pod cannot help.
TRAINER_CONFIG_ERROR_EXIT = 2

SERVE_IMPORT_PATH, SERVE_APP = deployment.IMPORT_PATH, deployment.APP_NAME
MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT = deployment.MODEL_DEPLOYMENT, deployment.INGRESS_DEPLOYMENT
SERVE_PORT = 8000
RAY_VERSION = "2.60.0"
# libyaml when present: rendering serveConfigV2 and run.yaml is most of the operator's CPU time.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
HEAD_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
GPU = "nvidia.com/gpu"
# Where a multi-worker round's first pod serves the rendezvous (torchrun's default port).
RDZV_PORT = 29400


# -- names and metadata --------------------------------------------------------------------------
def job_name(run: str, round_: int, attempt: int = 1) -> str:
    """`<run>-r<round>`; a retry of the same round gets `-<attempt>` (run names are <= 40 chars)."""
    return f"{run}-r{round_}" if attempt <= 1 else f"{run}-r{round_}-{attempt}"


def configmap_name(run: str) -> str:
    return f"{run}-config"


def rayservice_name(run: str) -> str:
    return run


def serve_service_name(run: str) -> str:
    """The Service KubeRay creates for a RayService's Serve HTTP proxies."""
    return f"{rayservice_name(run)}-serve-svc"


def ingress_name(run: str) -> str:
    return run


def labels(*, run: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "selflearn",
        "app.kubernetes.io/instance": run,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_RUN: run,
    }


def _meta(*, name: str, namespace: str, owner: Mapping[str, Any], labels_: dict[str, str],
          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels_, "ownerReferences": [dict(owner)]}
    if annotations:
        meta["annotations"] = annotations
    return meta


def storage_env(spec: LearnerRunSpec) -> list[dict[str, str]]:
    env = []
    if spec.storage.endpoint:
        env.append({"name": "S3_ENDPOINT", "value": spec.storage.endpoint})
    if spec.storage.region:
        env.append({"name": "AWS_REGION", "value": spec.storage.region})
    return env


def credentials_env_from(spec: LearnerRunSpec) -> list[dict[str, Any]]:
    secret = spec.storage.credentials_secret
    return [{"secretRef": {"name": secret}}] if secret else []


# -- trainer ---------------------------------------------------------------------------------------
def run_config(*, run: str, spec: LearnerRunSpec) -> dict[str, Any]:
    """What `selflearn train --run-config` reads: the run's name and its validated, defaulted spec."""
    return {"name": run, "spec": spec.model_dump(by_alias=True, mode="json")}


def build_run_configmap(*, run: str, namespace: str, owner: Mapping[str, Any], spec: LearnerRunSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name=configmap_name(run), namespace=namespace, owner=owner,
                          labels_=labels(run=run, component="run-config")),
        "data": {RUN_CONFIG_KEY: yaml.dump(run_config(run=run, spec=spec), Dumper=_DUMPER, sort_keys=False)},
    }


def trainer_command(*, round_: int, parent: str | None) -> list[str]:
    return ["selflearn", "train", "--run-config", f"{RUN_CONFIG_DIR}/{RUN_CONFIG_KEY}",
            "--round", str(round_), "--parent", parent or "base", "--no-progress"]


def trainer_procs(spec: LearnerRunSpec) -> int:
    """Ranks in each trainer pod: trainer.procsPerWorker, else one per GPU the pod asks for, else 1."""
    return spec.trainer.procs_per_worker or max(1, _gpus(spec.trainer.resources))


def rendezvous_endpoint(job: str) -> str:
    """Where a multi-worker round's ranks meet: the first pod, by its name in the headless Service."""
    return f"{job}-0.{job}:{RDZV_PORT}"


def distributed_flags(spec: LearnerRunSpec, job: str) -> list[str]:
    """`selflearn train`'s launcher flags for this run (none for one process)."""
    workers, procs = spec.trainer.workers, trainer_procs(spec)
    flags = ["--procs", str(procs)] if procs > 1 else []
    if workers > 1:
        flags += ["--nnodes", str(workers), "--rdzv-endpoint", rendezvous_endpoint(job), "--rdzv-id", job,
                  # Each pod's own name in the Service (the kubelet expands the index the Job sets),
                  # where rank 0's pod serves the process group to the others.
                  "--local-addr", f"{job}-$(JOB_COMPLETION_INDEX).{job}"]
    return flags


def job_owner(job: Mapping[str, Any]) -> dict[str, Any]:
    """An owner reference to a created Job: what it owns goes when the Job is deleted."""
    meta = job["metadata"]
    return {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def build_trainer_service(*, run: str, namespace: str, job: Mapping[str, Any]) -> dict[str, Any]:
    """The headless Service that gives a multi-worker round's pods DNS names (`<job>-<index>.<job>`),
    owned by the Job so it goes with it."""
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name=name, namespace=namespace, owner=job_owner(job),
                          labels_=labels(run=run, component="trainer")),
        "spec": {
            "clusterIP": "None",
            "selector": {"batch.kubernetes.io/job-name": name},
            # The ranks meet before any of them is ready: their names must resolve from the start.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }


def build_trainer_job(*, run: str, namespace: str, owner: Mapping[str, Any], spec: LearnerRunSpec,
                      round_: int, attempt: int, parent: str | None) -> dict[str, Any]:
    """One round's Job. `parent` is the serving checkpoint URI (None: the base model)."""
    job_labels = labels(run=run, component="trainer") | {LABEL_ROUND: str(round_), LABEL_ATTEMPT: str(attempt)}
    t = spec.trainer
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": t.image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(round_=round_, parent=parent) + distributed_flags(spec, job_name(run, round_, attempt)),
        "env": [*storage_env(spec),
                {"name": "HF_HOME", "value": "/tmp/huggingface"},
                {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "volumeMounts": [{"name": "run-config", "mountPath": RUN_CONFIG_DIR, "readOnly": True},
                         {"name": "scratch", "mountPath": "/tmp"}],
        # The result is one JSON line here; on a crash Kubernetes keeps the log tail instead.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env_from := credentials_env_from(spec):
        container["envFrom"] = env_from
    if t.resources:
        container["resources"] = t.resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "run-config", "configMap": {"name": configmap_name(run)}},
                    {"name": "scratch", "emptyDir": {}}],
    }
    if t.cache_volume_claim:
        # Compiled kernels and hub downloads outlive the pod; the embedded model's weights stay in
        # the image's own cache (dequantised per pod in ~2 s), so a fresh volume costs nothing more.
        container["env"] = [e for e in container["env"] if e["name"] != "HF_HOME"] + [
            {"name": "HF_HOME", "value": f"{TRAINER_CACHE_DIR}/huggingface"},
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{TRAINER_CACHE_DIR}/torch-compile"}]
        container["volumeMounts"].append({"name": "cache", "mountPath": TRAINER_CACHE_DIR})
        pod_spec["volumes"].append({"name": "cache", "persistentVolumeClaim": {"claimName": t.cache_volume_claim}})
        pod_spec["securityContext"] = {"fsGroup": TRAINER_UID, "fsGroupChangePolicy": "OnRootMismatch"}
    workers = t.workers
    if workers > 1:
        pod_spec["subdomain"] = job_name(run, round_, attempt)  # the headless Service: <job>-<index>.<job>
        container["ports"] = [{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    if t.node_selector:
        pod_spec["nodeSelector"] = dict(t.node_selector)
    if t.tolerations:
        pod_spec["tolerations"] = list(t.tolerations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(name=job_name(run, round_, attempt), namespace=namespace, owner=owner,
                          labels_=job_labels, annotations={ANNOTATION_PARENT: parent or "base"}),
        "spec": {
            "backoffLimit": t.backoff_limit,
            "activeDeadlineSeconds": t.active_deadline_seconds,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob",
                 "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In",
                                 "values": [TRAINER_CONFIG_ERROR_EXIT]}},
                # A preempted or evicted pod is not the trainer's fault: retry without counting it.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ] + ([
                # One index retried alone could never meet the ranks that already left: any rank
                # failing fails the whole Job, and the round is retried as a whole (a new Job).
                {"action": "FailJob", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "NotIn",
                                                      "values": [0]}},
            ] if workers > 1 else [])},
            **({"completionMode": "Indexed", "completions": workers, "parallelism": workers}
               if workers > 1 else {}),
            "template": {"metadata": {"labels": job_labels}, "spec": pod_spec},
        },
    }


# -- serving ---------------------------------------------------------------------------------------
def _gpus(resources: dict[str, Any]) -> int:
    limits = (resources or {}).get("limits") or {}
    try:
        return int(limits.get(GPU, 0))
    except (TypeError, ValueError):
        return 0


def serve_args(*, spec: LearnerRunSpec, run: str) -> dict[str, Any]:
    """The app's args: nothing a promotion changes. Ray Serve redeploys an application (new ingress
    and model replicas) whenever its `args` change, but applies a change of a deployment's
    `user_config` alone in place through `reconfigure()`; so the checkpoint lives only in the model's
    user_config, and promotions stay hot swaps.

    Feedback goes where the run's feedback source reads it: by default the run's own store
    (`<storage.uri>/<run>/feedback/`, beside its checkpoints), so thumbs and corrections outlive the
    serving pods and the trainer Job reads them with the run's credentials."""
    fb = spec.feedback
    args: dict[str, Any] = {"base_model": spec.base_model,
                            "feedback_uri": (fb.uri if fb and fb.uri else feedback_uri(spec.storage.uri, run))}
    args.update({k: v for k, v in (("storage_endpoint", spec.storage.endpoint),
                                   ("storage_region", spec.storage.region)) if v})
    return args


def serve_config(*, spec: LearnerRunSpec, checkpoint: str | None, run: str) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2): one application, the model and the HTTP ingress."""
    replicas = spec.serving.replicas
    return {"controller_options": deployment.controller_options(), "applications": [deployment.application(
        user_config=deployment.run_user_config(spec, checkpoint), args=serve_args(spec=spec, run=run),
        model_replicas=replicas, model_gpus=_gpus(spec.serving.resources),
        ingress_replicas=1 if replicas <= 1 else 2)]}


def served_checkpoint(serve_config_v2: str | None) -> tuple[bool, str | None]:
    """(found, checkpoint) as read back from a RayService's serveConfigV2 string."""
    try:
        doc = yaml.load(serve_config_v2 or "", Loader=_LOADER) or {}
    except yaml.YAMLError:
        return False, None
    return deployment.served_checkpoint(doc if isinstance(doc, dict) else None)


def render_serve_config(*, spec: LearnerRunSpec, checkpoint: str | None, run: str) -> str:
    return yaml.dump(serve_config(spec=spec, checkpoint=checkpoint, run=run), Dumper=_DUMPER, sort_keys=False)


def _ray_container(*, name: str, spec: LearnerRunSpec, resources: dict[str, Any],
                   ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": spec.serving.image, "imagePullPolicy": "IfNotPresent",
                         "env": [*storage_env(spec), {"name": "HF_HOME", "value": "/tmp/huggingface"}]}
    if env_from := credentials_env_from(spec):
        c["envFrom"] = env_from
    if resources:
        c["resources"] = resources
    if ports:
        c["ports"] = ports
    return c


def build_rayservice(*, run: str, namespace: str, owner: Mapping[str, Any], spec: LearnerRunSpec,
                     checkpoint: str | None) -> dict[str, Any]:
    """A KubeRay RayService: a head (Serve controller and proxy, no model replicas) and one worker
    per model replica. KubeRay creates `<run>-serve-svc` on port 8000 in front of the proxies."""
    replicas = spec.serving.replicas
    head = _ray_container(name="ray-head", spec=spec, resources=HEAD_RESOURCES, ports=[
        {"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": SERVE_PORT}])
    worker = _ray_container(name="ray-worker", spec=spec, resources=spec.serving.resources)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(name=rayservice_name(run), namespace=namespace, owner=owner,
                          labels_=labels(run=run, component="serving")),
        "spec": {
            "serveConfigV2": render_serve_config(spec=spec, checkpoint=checkpoint, run=run),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    # num-cpus 0: model replicas never land on the head.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {"spec": {"containers": [head]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "model",
                    "replicas": replicas,
                    "minReplicas": replicas,
                    "maxReplicas": max(replicas, 1),
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [worker]}},
                }],
            },
        },
    }


def build_ingress(*, run: str, namespace: str, owner: Mapping[str, Any], spec: LearnerRunSpec) -> dict[str, Any]:
    """Routes / (the chat page, /chat, /v1) to the Serve HTTP proxies; answers stream, so no buffering."""
    ing = spec.serving.ingress
    rule: dict[str, Any] = {"http": {"paths": [{
        "path": "/", "pathType": "Prefix",
        "backend": {"service": {"name": serve_service_name(run), "port": {"number": SERVE_PORT}}},
    }]}}
    if ing.host:
        rule["host"] = ing.host
    body: dict[str, Any] = {"rules": [rule]}
    if ing.class_name:
        body["ingressClassName"] = ing.class_name
    if ing.tls_secret and ing.host:
        body["tls"] = [{"hosts": [ing.host], "secretName": ing.tls_secret}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _meta(name=ingress_name(run), namespace=namespace, owner=owner,
                          labels_=labels(run=run, component="ingress"),
                          annotations={"nginx.ingress.kubernetes.io/proxy-buffering": "off",
                                       "nginx.ingress.kubernetes.io/proxy-read-timeout": "300"}),
        "spec": body,
    }
