"""What the operator hands to Kubernetes is valid there, and the LearnerRun CRD says what the spec says.

- Every Job, ConfigMap and Ingress the builders produce passes `kubernetes-validate --strict`
  (Kubernetes 1.30 and the newest schemas); every RayService passes KubeRay's own CRD schema,
  and its serveConfigV2 passes Ray Serve's own config schema.
- The committed CRD is the one generated from selflearn/spec.py; the examples pass it and the
  operator's parser; each deliberately bad manifest fails both; and both agree on every bound.
"""

from __future__ import annotations

import ast
import copy
import functools
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kopf
import kubernetes_validate
import pytest
import yaml

from selflearn.operator import crd, resources as res
from selflearn.operator.handlers import validate as operator_validate
from selflearn.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]
RAYSERVICE_CRD = REPO.parent / "shared" / "schemas" / "ray.io_rayservices.yaml"
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# What the operator passes its builders: Kopf's owner reference of the LearnerRun.
OWNER = kopf.build_owner_reference(kopf.Body({
    "apiVersion": f"{crd.GROUP}/{crd.VERSION}", "kind": crd.KIND,
    "metadata": {"name": "wiki", "uid": "9d1c5a54-3d8e-4c34-9d0a-2b6f3e0c1a11"}}))
EXAMPLES = sorted((REPO / "examples").glob("learnerrun-*.yaml"))
BAD = sorted((REPO / "tests" / "data" / "bad-learnerruns").glob("*.yaml"))

FULL = parse_spec({
    "baseModel": "facebook/opt-350m",
    "storage": {"uri": "s3://ckpt/runs", "endpoint": "http://minio:9000", "region": "eu-west-1",
                "credentialsSecret": "s3-creds"},
    "trainer": {"resources": {"limits": {"nvidia.com/gpu": 1, "memory": "24Gi"}, "requests": {"cpu": "4"}},
                "nodeSelector": {"gpu": "a100"}, "cacheVolumeClaim": "trainer-cache",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "serving": {"replicas": 2, "resources": {"limits": {"nvidia.com/gpu": 1}},
                "ingress": {"host": "chat.example.com", "className": "nginx", "tlsSecret": "chat-tls"}},
    "sources": [{"snapshot": {}}, {"feedback": {"perClientCap": 3}}],
})
MINIMAL = parse_spec({})
# A round on 2 pods x 4 GPUs (ranks per pod: the pod's GPU count).
DISTRIBUTED = parse_spec({"baseModel": "facebook/opt-1.3b", "trainer": {
    "workers": 2, "strategy": "fsdp", "resources": {"limits": {"nvidia.com/gpu": 4}}}})
SPECS = {"full": FULL, "minimal": MINIMAL, "distributed": DISTRIBUTED}


def k8s_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for label, spec in SPECS.items():
        kw = dict(run="wiki", namespace="default", owner=OWNER, spec=spec)
        yield f"job-{label}", res.build_trainer_job(**kw, round_=7, attempt=2, parent="s3://ckpt/runs/wiki/r000006")
        yield f"configmap-{label}", res.build_run_configmap(**kw)
        yield f"ingress-{label}", res.build_ingress(**kw)
    job = res.build_trainer_job(run="wiki", namespace="default", owner=OWNER, spec=DISTRIBUTED, round_=3,
                                attempt=1, parent=None)
    job["metadata"]["uid"] = "0b9d2a54-3d8e-4c34-9d0a-2b6f3e0c1a12"  # what the API server gives the created Job
    yield "service-distributed", res.build_trainer_service(run="wiki", namespace="default", job=job)
    yield "crd", crd.build_crd()


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name,obj", list(k8s_objects()), ids=[n for n, _ in k8s_objects()])
def test_builders_produce_objects_kubernetes_accepts_strictly(name: str, obj: dict, version: str):
    kubernetes_validate.validate(obj, version, strict=True)


def openapi_to_jsonschema(node: Any, *, strict: bool = True) -> Any:
    """An OpenAPI v3 (Kubernetes structural) schema as Draft 4 JSON Schema. `strict` rejects
    unknown fields, as `kubectl apply` does with server-side field validation."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if node.pop("x-kubernetes-int-or-string", False):
        return {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    nullable = node.pop("nullable", False)
    for key in [k for k in node if k.startswith("x-kubernetes-")]:
        node.pop(key)
    if "properties" in node:
        node["properties"] = {k: openapi_to_jsonschema(v, strict=strict) for k, v in node["properties"].items()}
        if strict and not preserve:
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = openapi_to_jsonschema(node["additionalProperties"], strict=strict)
    if "items" in node:
        node["items"] = openapi_to_jsonschema(node["items"], strict=strict)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [openapi_to_jsonschema(s, strict=False) for s in node[key]]
    if nullable and "type" in node:
        node["type"] = [node["type"], "null"]
    return node


def crd_validator(crd_doc: dict[str, Any], version: str) -> jsonschema.Draft4Validator:
    schema = next(v for v in crd_doc["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(openapi_to_jsonschema(schema))


@functools.lru_cache(maxsize=1)
def rayservice_validator() -> jsonschema.Draft4Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB of YAML
    return crd_validator(yaml.load(RAYSERVICE_CRD.read_text(), Loader=loader), "v1")


def test_the_trainer_job_reads_feedback_with_the_runs_own_credentials():
    """Nothing new from the cluster: the run config the Job mounts carries the feedback source,
    and the Job already has the store's endpoint and credentials; serving writes where it reads."""
    kw = dict(run="wiki", namespace="default", owner=OWNER, spec=FULL)
    mounted = yaml.safe_load(res.build_run_configmap(**kw)["data"][res.RUN_CONFIG_KEY])
    assert mounted["spec"]["sources"][1]["feedback"]["perClientCap"] == 3
    c = res.build_trainer_job(**kw, round_=2, attempt=1, parent=None)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "S3_ENDPOINT", "value": "http://minio:9000"} in c["env"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    args = res.serve_args(spec=FULL, run="wiki")
    assert args["feedback_uri"] == "s3://ckpt/runs/wiki/feedback" and args["storage_endpoint"] == "http://minio:9000"


def test_a_multi_worker_round_is_an_indexed_job_whose_pods_meet_through_a_headless_service():
    job = res.build_trainer_job(run="wiki", namespace="default", owner=OWNER, spec=DISTRIBUTED, round_=3,
                                attempt=2, parent=None)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "wiki-r3-2"  # pods are wiki-r3-2-0.wiki-r3-2 and wiki-r3-2-1.wiki-r3-2
    command = pod["containers"][0]["command"]
    assert command[command.index("--procs") + 1] == "4"  # one rank per GPU of the pod
    assert command[command.index("--nnodes") + 1] == "2"
    assert command[command.index("--rdzv-endpoint") + 1] == "wiki-r3-2-0.wiki-r3-2:29400"
    assert command[command.index("--local-addr") + 1] == "wiki-r3-2-$(JOB_COMPLETION_INDEX).wiki-r3-2"
    # Any rank failing fails the whole Job: one index retried alone could never meet the others.
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "NotIn", "values": [0]}} \
        in rules
    job["metadata"]["uid"] = "0b9d2a54-3d8e-4c34-9d0a-2b6f3e0c1a12"
    svc = res.build_trainer_service(run="wiki", namespace="default", job=job)
    assert svc["metadata"]["name"] == pod["subdomain"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": "wiki-r3-2"}
    (owner,) = svc["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", "wiki-r3-2", job["metadata"]["uid"])
    # One worker with one process is the plain Job of before.
    plain = res.build_trainer_job(run="wiki", namespace="default", owner=OWNER, spec=MINIMAL, round_=3,
                                  attempt=1, parent=None)
    assert "completionMode" not in plain["spec"] and "subdomain" not in plain["spec"]["template"]["spec"]
    assert "--procs" not in plain["spec"]["template"]["spec"]["containers"][0]["command"]


def test_a_cache_claim_keeps_compiled_kernels_and_downloads_across_rounds():
    kw = dict(run="wiki", namespace="default", owner=OWNER, round_=2, attempt=1, parent=None)
    pod = res.build_trainer_job(**kw, spec=FULL)["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(res.TRAINER_CACHE_DIR + "/")
    assert env["HF_HOME"].startswith(res.TRAINER_CACHE_DIR + "/")
    assert [e["name"] for e in c["env"]].count("HF_HOME") == 1
    assert {"name": "cache", "mountPath": res.TRAINER_CACHE_DIR} in c["volumeMounts"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "trainer-cache"}} in pod["volumes"]
    assert pod["securityContext"]["fsGroup"] == res.TRAINER_UID  # a fresh volume is writable by the image's user
    plain = res.build_trainer_job(**kw, spec=MINIMAL)["spec"]["template"]["spec"]
    assert "securityContext" not in plain and all("persistentVolumeClaim" not in v for v in plain["volumes"])
    assert "TORCHINDUCTOR_CACHE_DIR" not in {e["name"] for e in plain["containers"][0]["env"]}


@pytest.mark.parametrize("label", SPECS)
def test_a_promotion_changes_only_the_models_user_config(label: str):
    """Ray Serve redeploys an application whose `args` (or any deployment option but `user_config`)
    change; a promotion must stay an in-place `reconfigure()` on the cluster path too."""
    before, after = (yaml.safe_load(res.render_serve_config(spec=SPECS[label], checkpoint=c, run="wiki"))
                     for c in (None, "s3://ckpt/runs/wiki/r000001"))
    for doc in (before, after):
        for dep in doc["applications"][0]["deployments"]:
            if dep["name"] == res.MODEL_DEPLOYMENT:
                del dep["user_config"]
    assert before == after
    assert res.served_checkpoint(res.render_serve_config(spec=SPECS[label], checkpoint="s3://x/r1", run="wiki")) \
        == (True, "s3://x/r1")


@pytest.mark.skipif(not RAYSERVICE_CRD.exists(), reason="KubeRay's RayService CRD schema is not available")
@pytest.mark.parametrize("label", SPECS)
def test_rayservice_matches_kuberays_schema_and_ray_serves_config(label: str):
    validator = rayservice_validator()
    rs = res.build_rayservice(run="wiki", namespace="default", owner=OWNER, spec=SPECS[label],
                              checkpoint="s3://ckpt/runs/wiki/r000003")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(rs)]
    assert not errors, errors
    schema = pytest.importorskip("ray.serve.schema")
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    (app,) = config.applications
    model = next(d for d in app.deployments if d.name == res.MODEL_DEPLOYMENT)
    assert app.import_path == "selflearn.serving.app:app_builder"
    assert model.user_config["checkpoint"] == "s3://ckpt/runs/wiki/r000003"
    assert model.num_replicas == SPECS[label].serving.replicas


def test_the_serving_app_named_in_the_rayservice_exists():
    module, attr = res.SERVE_IMPORT_PATH.split(":")
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO)} is not written yet")
    names = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name)}
    assert attr in names


def test_committed_crd_is_generated_from_the_spec():
    committed = (REPO / "crds" / "learnerrun.yaml").read_text()
    assert committed == crd.render(), "run: python -m selflearn.operator.crd > crds/learnerrun.yaml"


def _spec_validator() -> jsonschema.Draft4Validator:
    return crd_validator(crd.build_crd(), crd.VERSION)


def _accepted_by_operator(doc: dict[str, Any]) -> bool:
    try:
        operator_validate(doc["metadata"]["name"], doc.get("spec") or {})
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_the_crd_and_the_operator(path: Path):
    doc = yaml.safe_load(path.read_text())
    assert not list(_spec_validator().iter_errors(doc))
    assert _accepted_by_operator(doc)


def test_the_gpu_example_keeps_the_seeds_hyperparameters():
    spec = parse_spec(yaml.safe_load((REPO / "examples" / "learnerrun-opt350m-gpu.yaml").read_text())["spec"])
    t = spec.training
    assert (spec.base_model, t.epochs, t.batch_size, t.gradient_accumulation, t.learning_rate, t.weight_decay,
            t.precision) == ("facebook/opt-350m", 1, 4, 4, 2e-5, 0.01, "fp16")
    assert spec.trainer.resources["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_bad_manifests_fail_the_crd_and_the_operator(path: Path):
    doc = yaml.safe_load(path.read_text())
    assert list(_spec_validator().iter_errors(doc)), f"the CRD accepts {path.name}"
    assert not _accepted_by_operator(doc), f"the operator accepts {path.name}"


def _leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    for name, sub in (schema.get("properties") or {}).items():
        if sub.get("type") == "object":
            yield from _leaves(sub, path + (name,))
        elif sub.get("type") == "array" and (sub.get("items") or {}).get("type") == "object":
            yield from _leaves(sub["items"], path + (name, "[]"))
        else:
            yield path + (name,), sub


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = [out] if part == "[]" else {part: out}
    return out


def _probes(leaf: dict[str, Any]) -> Iterator[tuple[Any, bool]]:
    """(value, should_be_accepted) at and just beyond each bound, and outside each enum."""
    step = 1 if leaf.get("type") == "integer" else 1e-6
    if "minimum" in leaf:
        lo = leaf["minimum"]
        yield (lo + step, True) if leaf.get("exclusiveMinimum") else (lo, True)
        yield (lo, False) if leaf.get("exclusiveMinimum") else (lo - step, False)
    if "maximum" in leaf:
        hi = leaf["maximum"]
        yield (hi - step, True) if leaf.get("exclusiveMaximum") else (hi, True)
        yield (hi, False) if leaf.get("exclusiveMaximum") else (hi + step, False)
    for value in leaf.get("enum") or []:
        yield value, True
    if "enum" in leaf:
        yield "not-an-option", False


def test_the_crd_and_the_operator_agree_on_every_bound_and_enum():
    validator = _spec_validator()
    checked = 0
    for path, leaf in _leaves(crd.spec_schema()):
        if ".".join(p for p in path if p != "[]").startswith(crd.KUBERNETES_SHAPES):
            continue  # Kubernetes' own shapes (resources, tolerations): the CRD checks them, the pod would too
        for value, expected in _probes(leaf):
            doc = {"apiVersion": "selflearn.dev/v1alpha1", "kind": "LearnerRun", "metadata": {"name": "probe"},
                   "spec": _nest(path, value)}
            if path[0] == "sources":  # a source item names its kind; this probe is its only field
                doc["spec"] = {"sources": [_nest(path[2:], value)]}
            crd_ok = not list(validator.iter_errors(copy.deepcopy(doc)))
            assert (crd_ok, _accepted_by_operator(doc)) == (expected, expected), (".".join(path), value)
            checked += 1
    assert checked > 50


def test_the_status_the_operator_writes_passes_the_crds_status_schema():
    """Strictly (an unknown field fails): the API server would prune what its schema lacks."""
    from datetime import datetime, timezone

    from selflearn.contracts import RoundMetrics, RoundResult
    from selflearn.operator import scheduling as sched
    from selflearn.operator.results import SUCCEEDED, JobView
    from selflearn.operator.status import LearnerRunStatus
    from selflearn.policy import decide

    now = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
    metrics = RoundMetrics.parse({"train_loss": 2.0, "ppl": {"general": {"before": 20.0, "after": 19.0}}, "held_out": 0,
                                  "knowledge": {"learned": {"before": 0.2, "after": 0.4}, "asked": {"learned": 3}},
                                  "chat": {"retention": 0.97, "format_ok": {"before": 1.0, "after": 1.0}}})
    result = RoundResult("published", 1, "s3://ckpt/runs/wiki/r000001", metrics)
    s = LearnerRunStatus(phase="Serving", message="round 2 starts at ...", observed_generation=2)
    s.record(sched.finished_row(job=JobView("wiki-r1", 1, 1, SUCCEEDED), now=now, result=result,
                                decision=decide(MINIMAL, metrics, candidate=result.checkpoint)), keep=20)
    s.record(sched.failed_row(round_=2, attempt=1, job="wiki-r2", now=now, reason="OOMKilled"), keep=20)
    s.set_progress(sched.after_failure(s.progress, now=now, base=30, cap=600))
    s.conditions = sched.set_condition(s.conditions, type_="Ready", status=True, reason="ServingReady",
                                       message="serving", now=now, generation=2)
    doc = {"apiVersion": "selflearn.dev/v1alpha1", "kind": "LearnerRun", "metadata": {"name": "wiki"}, "spec": {},
           "status": s.stored() | {"activeJob": None}}
    assert set(doc["status"]["history"][0]) > {"knowledgeAfter", "chatRetention", "finishedAt", "promoted"}
    assert not [e.message for e in _spec_validator().iter_errors(doc)]
    doc["status"]["history"][0]["perplexityAftr"] = 19.0
    assert list(_spec_validator().iter_errors(doc))


@pytest.mark.parametrize("memory,expected", [
    ("off", {"enabled": False, "passages": 2, "threshold": 5.0}),
    ({"passages": 4, "threshold": 7}, {"enabled": True, "passages": 4, "threshold": 7.0}),
    (None, None),  # the defaults: nothing in the user_config, the model's own defaults apply
])
def test_the_runs_memory_knobs_reach_the_models_user_config(memory, expected):
    """`serving.memory` in a LearnerRun (YAML's `off` is false) becomes the ChatModel's
    user_config.memory, which serving validates and applies in place."""
    from selflearn.serving.config import parse_model_config

    doc = {"serving": {"memory": yaml.safe_load(memory) if isinstance(memory, str) else memory}} if memory else {}
    spec = parse_spec(doc)
    cfg = yaml.safe_load(res.render_serve_config(spec=spec, checkpoint="s3://x/run/r000001", run="run"))
    uc = next(d["user_config"] for d in cfg["applications"][0]["deployments"] if d["name"] == res.MODEL_DEPLOYMENT)
    assert uc.get("memory") == expected
    assert parse_model_config(uc).memory.enabled is (expected or {"enabled": True})["enabled"]


@pytest.mark.parametrize("serving,expected", [
    ({"engine": "torch"}, {"engine": "torch"}),
    ({"engine": "openvino", "quantization": "int8"}, {"engine": "openvino", "quantization": "int8"}),
    ({}, {}),  # auto and none: left to the model's defaults
])
def test_the_runs_engine_and_quantization_reach_the_models_user_config(serving, expected):
    from selflearn.serving.config import parse_model_config

    spec = parse_spec({"serving": serving})
    cfg = yaml.safe_load(res.render_serve_config(spec=spec, checkpoint="s3://x/run/r000001", run="run"))
    uc = next(d["user_config"] for d in cfg["applications"][0]["deployments"] if d["name"] == res.MODEL_DEPLOYMENT)
    assert {k: uc[k] for k in ("engine", "quantization") if k in uc} == expected
    parsed = parse_model_config(uc)
    assert (parsed.engine, parsed.quantization) == (serving.get("engine", "auto"), serving.get("quantization", "none"))


def test_an_unknown_engine_or_quantization_is_refused_by_the_spec_and_the_crd():
    with pytest.raises(ValueError, match="engine"):
        parse_spec({"serving": {"engine": "vllm"}})
    with pytest.raises(ValueError, match="quantization"):
        parse_spec({"serving": {"quantization": "int3"}})
    doc = {"apiVersion": "selflearn.dev/v1alpha1", "kind": "LearnerRun", "metadata": {"name": "wiki"},
           "spec": {"serving": {"engine": "vllm", "quantization": "int3"}}}
    errors = [e.message for e in _spec_validator().iter_errors(doc)]
    assert any("vllm" in m for m in errors) and any("int3" in m for m in errors)
