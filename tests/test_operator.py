"""The operator's lifecycle against kmock's in-memory Kubernetes, with the operator in-process.

The emulator has no controllers: the tests play the Job controller (a pod that ends with the
trainer's termination message, then the Job's Complete or Failed condition) and KubeRay (RayService
status). Ticks and backoffs are shortened; everything else is the production code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator

import yaml

from selflearn.operator.handlers import OperatorConfig
from tests.support.operator import Cluster, EmulatorThread, eventually, operator_task, published
from selflearn.spec import RunConfig

FAST = OperatorConfig(tick_seconds=0.1, retry_base_seconds=0.6, retry_max_seconds=5.0)
STORE = "s3://ckpt/runs"
SPEC: dict[str, Any] = {
    "baseModel": "facebook/opt-350m",
    "schedule": {"intervalSeconds": 0},
    "storage": {"uri": STORE, "endpoint": "http://minio:9000", "region": "eu-west-1", "credentialsSecret": "s3-creds"},
    "trainer": {"image": "registry.example/trainer:1", "resources": {"limits": {"nvidia.com/gpu": 1}},
                "nodeSelector": {"gpu": "a100"}, "backoffLimit": 3, "activeDeadlineSeconds": 1800,
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "serving": {"replicas": 2, "ingress": {"host": "chat.example.com"}},
}


@contextlib.asynccontextmanager
async def cluster(config: OperatorConfig = FAST, *, operator: bool = True) -> AsyncIterator[Cluster]:
    api = EmulatorThread().start()
    c = Cluster(api)
    try:
        if operator:
            async with operator_task(c.url, config=config):
                yield c
        else:
            yield c
    finally:
        await c.close()
        api.stop()


async def secret(c: Cluster, name: str = "s3-creds") -> None:
    await c.api.create("v1", "secrets", "default", {"apiVersion": "v1", "kind": "Secret",
                                                    "metadata": {"name": name}, "data": {}})


def status(c: Cluster, run: str = "wiki") -> dict[str, Any]:
    return c.learnerrun(run).get("status") or {}


def cond(c: Cluster, kind: str, run: str = "wiki") -> dict[str, Any]:
    return next((x for x in status(c, run).get("conditions") or [] if x["type"] == kind), {})


def served(c: Cluster, run: str = "wiki") -> str | None:
    rs = c.get("ray.io/v1", "rayservices", "default", run)
    doc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    model = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "ChatModel")
    return model["user_config"]["checkpoint"]


def parent_of(job: dict[str, Any]) -> str:
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    return cmd[cmd.index("--parent") + 1]


def seconds(start: str, end: str) -> float:
    """Between two of the status's timestamps."""
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def reasons(c: Cluster) -> list[str]:
    return [e.get("reason") for e in c.events()]


async def event(c: Cluster, reason: str) -> None:
    """Kopf posts Events in the background: wait for one."""
    await eventually(lambda: reason in reasons(c), what=f"a {reason} Event")


async def started(c: Cluster, spec: dict[str, Any] = SPEC, run: str = "wiki") -> dict[str, Any]:
    await secret(c)
    await c.create_learnerrun(run, spec)
    return (await eventually(lambda: c.jobs(run).get(f"{run}-r1"), what="Job r1"))


async def promote_round(c: Cluster, round_: int, *, after: float, before: float = 20.0, run: str = "wiki") -> None:
    await eventually(lambda: f"{run}-r{round_}" in c.jobs(run), what=f"Job r{round_}")
    await c.finish_job(f"{run}-r{round_}", result=published(run, round_, before=before, after=after))
    await eventually(lambda: len(status(c, run).get("history") or []) >= round_, what=f"round {round_} recorded")


def test_a_new_run_starts_round_one_with_the_right_job_and_serving():
    async def scenario():
        async with cluster() as c:
            job = await started(c)
            lr = c.learnerrun("wiki")
            pod = job["spec"]["template"]["spec"]
            trainer = pod["containers"][0]
            assert trainer["command"] == ["selflearn", "train", "--run-config", "/etc/selflearn/run.yaml",
                                          "--round", "1", "--parent", "base", "--no-progress"]
            assert trainer["image"] == "registry.example/trainer:1"
            assert trainer["resources"] == {"limits": {"nvidia.com/gpu": 1}}
            assert trainer["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
            assert {"name": "S3_ENDPOINT", "value": "http://minio:9000"} in trainer["env"]
            assert {"name": "AWS_REGION", "value": "eu-west-1"} in trainer["env"]
            assert trainer["terminationMessagePolicy"] == "FallbackToLogsOnError"
            assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"]) == (3, 1800)
            # The run config the trainer reads is the validated spec, under the run's name.
            cm = c.get("v1", "configmaps", "default", "wiki-config")
            assert {"name": "run-config", "configMap": {"name": "wiki-config"}} in pod["volumes"]
            config = RunConfig.model_validate(yaml.safe_load(cm["data"]["run.yaml"]))
            assert (config.name, config.spec.base_model, config.spec.storage.uri) == ("wiki", "facebook/opt-350m", STORE)
            # Serving starts on the base model; the Ingress routes to KubeRay's serve Service.
            await eventually(lambda: c.get("networking.k8s.io/v1", "ingresses", "default", "wiki"))
            assert served(c) is None
            rs = c.get("ray.io/v1", "rayservices", "default", "wiki")
            assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 2
            ing = c.get("networking.k8s.io/v1", "ingresses", "default", "wiki")
            backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
            assert (ing["spec"]["rules"][0]["host"], backend) == ("chat.example.com",
                                                                  {"name": "wiki-serve-svc", "port": {"number": 8000}})
            # Everything the run made goes when the run goes (Kubernetes' garbage collector).
            children = [job, cm, rs, ing]
            assert all(x["metadata"]["ownerReferences"] == [{
                "apiVersion": "selflearn.dev/v1alpha1", "kind": "LearnerRun", "name": "wiki",
                "uid": lr["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}] for x in children)
            st = await eventually(lambda: status(c).get("observedGeneration") and status(c).get("activeJob")
                                  and status(c))
            assert (st["phase"], st["round"], st["activeJob"], st["observedGeneration"]) == ("Training", 1, "wiki-r1", 1)
            assert cond(c, "TrainerRunning")["status"] == "True"
            await event(c, "RoundStarted")

    asyncio.run(scenario())


def test_a_good_round_is_promoted_to_the_rayservice_and_recorded():
    async def scenario():
        async with cluster() as c:
            await started(c)
            await promote_round(c, 1, before=20.0, after=19.0)
            uri = f"{STORE}/wiki/r000001"
            assert served(c) == uri
            st = status(c)
            assert st["servingCheckpoint"] == uri and st["lastPerplexity"] == 19.0
            (row,) = st["history"]
            assert (row["round"], row["result"], row["promoted"], row["checkpoint"]) == (1, "promoted", True, uri)
            assert (row["perplexityBefore"], row["perplexityAfter"], row["trainLoss"]) == (20.0, 19.0, 2.5)
            assert row["reason"].startswith("promoted: format 100%") and "general ppl 20.00->19.00" in row["reason"]
            # The next round trains from what is served now.
            r2 = await eventually(lambda: c.jobs("wiki").get("wiki-r2"))
            assert parent_of(r2) == uri
            assert cond(c, "Degraded")["status"] == "False"
            await event(c, "Promoted")
            # Ready follows KubeRay's own report on the RayService.
            assert cond(c, "Ready")["status"] == "False"
            await c.api.patch("ray.io/v1", "rayservices", "default", "wiki",
                              {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, subresource="status")
            ready = await eventually(lambda: cond(c, "Ready").get("status") == "True" and cond(c, "Ready"))
            assert uri in ready["message"]

    asyncio.run(scenario())


def test_a_regressing_round_is_not_promoted_and_says_why():
    async def scenario():
        async with cluster() as c:
            await started(c, {**SPEC, "schedule": {"intervalSeconds": 0, "maxRounds": 2}})
            await promote_round(c, 1, after=19.0)
            await promote_round(c, 2, before=19.0, after=21.0)  # +10.5% on the general set
            st = status(c)
            row = st["history"][-1]
            assert (row["result"], row["promoted"], row["checkpoint"]) == ("rejected", False, f"{STORE}/wiki/r000002")
            assert row["reason"].startswith("rejected: general ppl 19.00->21.00 (+10.5%, limit +2.0%)")
            assert served(c) == st["servingCheckpoint"] == f"{STORE}/wiki/r000001"
            await event(c, "NotPromoted")
            # maxRounds: 2 -> no third round.
            await eventually(lambda: status(c).get("message", "").startswith("all 2 rounds done"))
            assert set(c.jobs("wiki")) == {"wiki-r1", "wiki-r2"} and status(c)["phase"] == "Serving"

    asyncio.run(scenario())


def test_a_failed_job_sets_degraded_and_is_retried_with_growing_backoff():
    async def scenario():
        async with cluster() as c:
            await started(c)
            crash = "Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory"
            await c.finish_job("wiki-r1", succeeded=False, log_tail=crash)
            st = await eventually(lambda: status(c).get("failures") == 1 and status(c))
            assert st["phase"] == "Retrying" and st.get("activeJob") is None
            degraded = cond(c, "Degraded")
            assert degraded["status"] == "True" and degraded["reason"] == "RoundFailed"
            assert "CUDA out of memory" in degraded["message"] and "BackoffLimitExceeded" in degraded["message"]
            row = st["history"][-1]
            assert (row["round"], row["attempt"], row["result"]) == (1, 1, "failed")
            assert seconds(row["finishedAt"], st["nextRoundAt"]) == 0.6
            await event(c, "RoundFailed")
            # The retry is the same round (same parent), under the next attempt's name.
            retry = await eventually(lambda: c.jobs("wiki").get("wiki-r1-2"), what="retry Job")
            cmd = retry["spec"]["template"]["spec"]["containers"][0]["command"]
            assert parent_of(retry) == "base" and cmd[cmd.index("--round") + 1] == "1"
            await c.finish_job("wiki-r1-2", succeeded=False, log_tail=json.dumps(
                {"status": "failed", "round": 1, "reason": "storage s3://ckpt is not reachable"}))
            st = await eventually(lambda: status(c).get("failures") == 2 and status(c))
            # 0.6s after the first failure, doubled after the second
            assert seconds(st["history"][-1]["finishedAt"], st["nextRoundAt"]) == 1.2
            assert "storage s3://ckpt is not reachable" in cond(c, "Degraded")["message"]
            await eventually(lambda: "wiki-r1-3" in c.jobs("wiki"), what="second retry")
            await c.finish_job("wiki-r1-3", result=published("wiki", 1))
            await eventually(lambda: status(c).get("activeJob") == "wiki-r2", what="round 2 after the recovery")
            assert status(c)["failures"] == 0 and cond(c, "Degraded")["status"] == "False"

    asyncio.run(scenario())


def test_suspend_stops_new_rounds_but_serving_stays():
    async def scenario():
        async with cluster() as c:
            await started(c)
            await c.patch_spec("wiki", {"suspend": True})
            await eventually(lambda: status(c).get("observedGeneration") == 2, what="observedGeneration 2")
            await promote_round(c, 1, after=19.0)  # the running round still finishes and is promoted
            st = await eventually(lambda: status(c).get("phase") == "Suspended" and status(c))
            await asyncio.sleep(0.5)  # five ticks
            assert set(c.jobs("wiki")) == {"wiki-r1"}
            assert served(c) == st["servingCheckpoint"] == f"{STORE}/wiki/r000001"
            await c.patch_spec("wiki", {"suspend": False})
            await eventually(lambda: "wiki-r2" in c.jobs("wiki"), what="round 2 after resuming")
            await eventually(lambda: status(c).get("observedGeneration") == 3, what="observedGeneration 3")

    asyncio.run(scenario())


def test_a_pin_rolls_serving_back_and_blocks_promotion():
    async def scenario():
        async with cluster() as c:
            await started(c)
            await promote_round(c, 1, after=19.0)
            await promote_round(c, 2, before=19.0, after=18.0)
            r1, r2 = f"{STORE}/wiki/r000001", f"{STORE}/wiki/r000002"
            assert served(c) == r2
            await c.patch_spec("wiki", {"promotion": {"pinnedCheckpoint": r1}})
            await eventually(lambda: served(c) == r1 and status(c).get("servingCheckpoint") == r1, what="rollback")
            await event(c, "Pinned")
            # A better round while pinned is recorded but not served.
            await eventually(lambda: "wiki-r3" in c.jobs("wiki"))
            await c.finish_job("wiki-r3", result=published("wiki", 3, before=18.0, after=10.0))
            await eventually(lambda: len(status(c).get("history") or []) == 3)
            assert status(c)["history"][-1]["result"] == "pinned" and served(c) == r1
            # Unpinning resumes learning from the rolled-back checkpoint.
            await c.patch_spec("wiki", {"promotion": {"pinnedCheckpoint": None}})
            r4 = await eventually(lambda: c.jobs("wiki").get("wiki-r4"))
            assert parent_of(r4) == r1 and served(c) == r1

    asyncio.run(scenario())


def test_an_operator_restarted_mid_round_leaves_exactly_one_job():
    async def scenario():
        async with cluster(operator=False) as c:
            async with operator_task(c.url, config=FAST):
                await started(c)
                await eventually(lambda: status(c).get("activeJob") == "wiki-r1")
                await event(c, "RoundStarted")
            # The worst moment to die: the Job exists, the status does not know it yet.
            await c.api.patch("selflearn.dev/v1alpha1", "learnerruns", "default", "wiki",
                              {"status": {"activeJob": None, "round": 0}}, subresource="status")
            async with operator_task(c.url, config=FAST):
                await eventually(lambda: status(c).get("activeJob") == "wiki-r1", what="adoption of wiki-r1")
                await asyncio.sleep(0.3)
                assert set(c.jobs("wiki")) == {"wiki-r1"}
                assert reasons(c).count("RoundStarted") == 1  # adopted, not started again
                # ...and the adopted round's result is used as usual.
                await promote_round(c, 1, after=19.0)
                await eventually(lambda: "wiki-r2" in c.jobs("wiki"))
                assert set(c.jobs("wiki")) == {"wiki-r1", "wiki-r2"}

    asyncio.run(scenario())


def test_a_bad_spec_fails_with_a_message_and_other_runs_carry_on():
    async def scenario():
        async with cluster() as c:
            await secret(c)
            await c.create_learnerrun("broken", {**SPEC, "training": {"learningRate": -1}})
            await c.create_learnerrun("wiki", SPEC)
            await eventually(lambda: "wiki-r1" in c.jobs("wiki"), what="the good run's Job")
            st = await eventually(lambda: status(c, "broken").get("phase") == "Failed" and status(c, "broken"))
            assert "training.learningRate" in st["message"]
            assert cond(c, "Degraded", "broken")["reason"] == "InvalidSpec"
            await event(c, "InvalidSpec")
            assert c.jobs("broken") == {}
            # Fixing the spec brings it to life.
            await c.patch_spec("broken", {"training": {"learningRate": 1e-4}})
            await eventually(lambda: "broken-r1" in c.jobs("broken"), what="Job after the fix")
            await eventually(lambda: status(c, "broken").get("phase") == "Training")

    asyncio.run(scenario())


def test_a_missing_credentials_secret_fails_naming_it_until_it_appears():
    async def scenario():
        async with cluster() as c:
            await c.create_learnerrun("wiki", SPEC)
            st = await eventually(lambda: status(c).get("phase") == "Failed" and status(c))
            assert "'s3-creds'" in st["message"] and "not found" in st["message"]
            assert cond(c, "Degraded")["reason"] == "SecretMissing" and c.jobs("wiki") == {}
            await secret(c)
            await eventually(lambda: "wiki-r1" in c.jobs("wiki"), what="Job once the Secret exists")
            await eventually(lambda: status(c).get("phase") == "Training" and cond(c, "Degraded")["status"] == "False")

    asyncio.run(scenario())


def test_deleting_a_run_removes_its_checkpoints_only_when_asked(tmp_path: Path):
    store = tmp_path / "ckpt"
    for run in ("keep", "wipe"):
        (store / run / "r000001").mkdir(parents=True)
        (store / run / "r000001" / "manifest.json").write_text("{}")

    async def scenario():
        async with cluster() as c:
            base = {"schedule": {"intervalSeconds": 0, "maxRounds": 1}, "serving": {"replicas": 0}}
            await c.create_learnerrun("keep", {**base, "storage": {"uri": f"file://{store}"}})
            await c.create_learnerrun("wipe", {**base, "storage": {"uri": f"file://{store}", "deleteOnRemoval": True}})
            for run in ("keep", "wipe"):
                await eventually(lambda: status(c, run).get("activeJob"), what=f"{run} running")
            for run in ("keep", "wipe"):
                await c.api.delete("selflearn.dev/v1alpha1", "learnerruns", "default", run)
            await eventually(lambda: not c.learnerrun("wipe") and not c.learnerrun("keep"), what="both gone")
            assert not (store / "wipe").exists()
            assert (store / "keep" / "r000001" / "manifest.json").exists()

    asyncio.run(scenario())


def test_a_trainer_pod_that_cannot_start_is_said_in_the_status_and_an_event():
    """A bad image tag leaves the pod waiting and the Job active: the status must say why, at once."""
    async def scenario():
        async with cluster() as c:
            job = await started(c)
            await c.api.create("v1", "pods", "default", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "wiki-r1-abcde", "labels": {"batch.kubernetes.io/job-name": "wiki-r1"},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "wiki-r1",
                                                  "uid": job["metadata"]["uid"], "controller": True}]},
                "spec": job["spec"]["template"]["spec"],
                "status": {"phase": "Pending", "containerStatuses": [{
                    "name": "trainer", "ready": False, "restartCount": 0, "image": "", "imageID": "",
                    "state": {"waiting": {"reason": "ImagePullBackOff",
                                          "message": 'Back-off pulling image "registry.example/trainer:nope"'}}}]}})
            st = await eventually(lambda: "cannot start" in (status(c).get("message") or "") and status(c),
                                  what="the status saying the pod cannot start")
            assert st["message"] == ('round 1 cannot start (Job wiki-r1): ImagePullBackOff: '
                                     'Back-off pulling image "registry.example/trainer:nope"')
            await event(c, "TrainerCannotStart")

    asyncio.run(scenario())


async def set_status(c: Cluster, fields: dict[str, Any], run: str = "wiki") -> None:
    """Write the status as someone else would (another operator version, a person with kubectl)."""
    await c.api.patch("selflearn.dev/v1alpha1", "learnerruns", "default", run, {"status": fields},
                      subresource="status")


def test_a_status_an_older_operator_wrote_is_repaired_or_refused_naming_the_field():
    """What the operator rewrites anyway (a history row with a result it no longer knows, a retired
    condition) is dropped and the run goes on; a round number it cannot read stops the run, saying
    which field, until a person fixes it: guessing could train a round again or serve other weights."""
    async def scenario():
        async with cluster() as c:
            await started(c)
            await eventually(lambda: status(c).get("activeJob") == "wiki-r1" and cond(c, "Ready"))
            old = {"round": 0, "attempt": 1, "job": "wiki-r0", "result": "skipped", "promoted": False,
                   "reason": "written by an older operator", "finishedAt": "2026-01-01T00:00:00Z"}
            await set_status(c, {"history": [old], "conditions": status(c)["conditions"] + [
                {"type": "Progressing", "status": "True", "reason": "Old", "message": ""}]})
            await event(c, "StatusRepaired")
            await eventually(lambda: status(c).get("history") == [] and len(status(c)["conditions"]) == 3,
                             what="the old row and condition removed")
            assert {x["type"] for x in status(c)["conditions"]} == {"Ready", "TrainerRunning", "Degraded"}

            await set_status(c, {"round": "three"})
            st = await eventually(lambda: status(c).get("phase") == "Failed" and status(c), what="Failed")
            assert st["message"].startswith("status.round: Input should be a valid integer")
            assert "'three'" in st["message"] and "kubectl patch" in st["message"]
            assert cond(c, "Degraded")["reason"] == "StatusUnreadable" and st["round"] == "three"
            await event(c, "StatusUnreadable")
            await c.finish_job("wiki-r1", result=published("wiki", 1))
            await asyncio.sleep(0.3)  # three ticks: the finished round is not acted upon
            assert status(c)["history"] == [] and set(c.jobs("wiki")) == {"wiki-r1"}
            # Fixed by hand: the run carries on where it was.
            await set_status(c, {"round": 1})
            await eventually(lambda: len(status(c).get("history") or []) == 1, what="round 1 recorded")
            assert status(c)["history"][0]["result"] == "promoted" and served(c) == f"{STORE}/wiki/r000001"
            await eventually(lambda: "wiki-r2" in c.jobs("wiki"), what="round 2")
            assert cond(c, "Degraded")["status"] == "False"

    asyncio.run(scenario())
