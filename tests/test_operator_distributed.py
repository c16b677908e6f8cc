"""A LearnerRun with trainer.workers > 1 under the operator, on kmock's emulated API server (the
tests play the Job controller, as in test_operator.py): an Indexed Job, a headless Service owned
by it, and the round's result read from its pods."""

from __future__ import annotations

import asyncio
import json

from tests.support.operator import eventually, published
from tests.test_operator import SPEC, cluster, cond, served, started, status

WORKERS = {**SPEC, "trainer": {**SPEC["trainer"], "workers": 2, "strategy": "ddp"}}
STORE = "s3://ckpt/runs"


def test_a_two_worker_round_runs_as_an_indexed_job_and_is_promoted():
    async def scenario():
        async with cluster() as c:
            job = await started(c, WORKERS)
            assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
            cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
            assert cmd[cmd.index("--rdzv-endpoint") + 1] == "wiki-r1-0.wiki-r1:29400"
            svc = await eventually(lambda: c.get("v1", "services", "default", "wiki-r1"), what="the headless Service")
            assert svc["spec"]["clusterIP"] == "None"
            (owner,) = svc["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["uid"]) == ("Job", job["metadata"]["uid"])  # goes with the Job
            # Both pods end with the round's result line (rank 0's, told to every pod).
            await c.finish_job("wiki-r1", result=published("wiki", 1))
            uri = f"{STORE}/wiki/r000001"
            await eventually(lambda: served(c) == uri, what="round 1 promoted")
            (row,) = await eventually(lambda: status(c).get("history"), what="round 1 recorded")
            assert (row["round"], row["result"], row["promoted"]) == (1, "promoted", True)
            # The next round is a new Job with its own Service.
            await eventually(lambda: c.get("v1", "services", "default", "wiki-r2"), what="round 2's Service")

    asyncio.run(scenario())


def test_a_failed_rank_is_named_in_the_status():
    async def scenario():
        async with cluster() as c:
            await started(c, WORKERS)
            first = {"status": "failed", "round": 1,
                     "reason": "rank 3 of 4 failed (killed by SIGKILL): no output"}
            then = {"status": "failed", "round": 1,
                    "reason": "rank 0 of 4 failed (exit code 1): RuntimeError: Connection closed by peer"}
            # Pod 1 (ranks 2-3) failed first; pod 0 lost its peer a second later.
            await c.finish_job("wiki-r1", succeeded=False, messages=[json.dumps(first), json.dumps(then)])
            st = await eventually(lambda: status(c).get("failures") == 1 and status(c))
            degraded = cond(c, "Degraded")
            assert "rank 3 of 4 failed (killed by SIGKILL)" in degraded["message"], degraded
            assert "PodFailurePolicy" in degraded["message"]
            assert st["history"][-1]["result"] == "failed"
            # The round is retried as a whole: a new Job, all indexes.
            retry = await eventually(lambda: c.jobs("wiki").get("wiki-r1-2"), what="retry Job")
            assert retry["spec"]["completions"] == 2

    asyncio.run(scenario())
