"""100 LearnerRuns created at once: how long until every one has its round-1 trainer Job, and how
much memory the operator holds. Prints one JSON object as its last line.

The Kubernetes API is kmock's emulator in a separate process (so it neither shares the operator's
CPU time slices in one event loop nor counts in its memory); the operator runs in this process
with its production settings (10 s reconcile tick, peering off), exactly as `selflearn operator`.

    python bench/operator_scale.py [--runs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

# The repository root, for tests.support (the emulator and the in-process operator live with the tests).
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from selflearn.operator.handlers import OperatorConfig  # noqa: E402
from selflearn.operator.kube import Connection, Kube  # noqa: E402
from tests.support.operator import operator_task  # noqa: E402

TARGET_SECONDS = 10.0
SPEC = {
    "schedule": {"intervalSeconds": 600},
    "storage": {"uri": "s3://bench/runs", "endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"},
    "serving": {"replicas": 1},
}


def _proc_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


async def scenario(url: str, runs: int) -> dict:
    api = Kube(Connection(server=url))
    await api.create("v1", "secrets", "default", {"apiVersion": "v1", "kind": "Secret",
                                                   "metadata": {"name": "s3-creds"}, "data": {}})
    rss_idle = _proc_kb("VmRSS") / 1024
    async with operator_task(url, config=OperatorConfig()):
        await asyncio.sleep(1.0)  # the operator is up and watching
        t0 = time.perf_counter()
        await asyncio.gather(*(api.create("selflearn.dev/v1alpha1", "learnerruns", "default", {
            "apiVersion": "selflearn.dev/v1alpha1", "kind": "LearnerRun",
            "metadata": {"name": f"run-{i:03d}"}, "spec": SPEC}) for i in range(runs)))
        created = time.perf_counter() - t0
        wanted = {f"run-{i:03d}-r1" for i in range(runs)}
        while True:
            jobs = {j["metadata"]["name"] for j in await api.list("batch/v1", "jobs", "default")}
            if wanted <= jobs:
                break
            if time.perf_counter() - t0 > 120:
                raise SystemExit(f"only {len(wanted & jobs)}/{runs} Jobs after 120 s")
            await asyncio.sleep(0.2)  # listing 100 Jobs is work for the API server too
        seconds = time.perf_counter() - t0
        lrs = await api.list("selflearn.dev/v1alpha1", "learnerruns", "default")
        training = sum((lr.get("status") or {}).get("phase") == "Training" for lr in lrs)
        await asyncio.sleep(2.0)  # a few more ticks of steady state
        rss = _proc_kb("VmRSS") / 1024
    await api.close()
    return {
        "runs": runs,
        "seconds_to_all_jobs": round(seconds, 2),
        "target_seconds": TARGET_SECONDS,
        "seconds_to_create_runs": round(created, 2),
        "runs_in_training_phase": training,
        "rss_mb": round(rss, 1),
        "rss_peak_mb": round(_proc_kb("VmHWM") / 1024, 1),
        "rss_before_runs_mb": round(rss_idle, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server = subprocess.Popen([sys.executable, "-m", "tests.support.operator"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        url = server.stdout.readline().strip()
        result = asyncio.run(scenario(url, args.runs))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
