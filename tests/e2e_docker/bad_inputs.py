"""The scenario's bad inputs, each a LearnerRun of its own without serving: a bad image tag, a
wrong Secret name, an unreachable S3 endpoint, and how long until its status says so."""

from __future__ import annotations

import json
import time
from typing import Any

from selflearn.operator.kube import Kube

from .checks import NS, check, log, wait_for


BAD_INPUTS = {  # run name: (spec change, what its status message must say)
    "bad-image": ({"trainer": {"image": "ghcr.io/selflearn/trainer:no-such-tag"}}, "ErrImagePull"),
    "bad-secret": ({"storage": {"credentialsSecret": "no-such-secret"}}, "no-such-secret"),
    "bad-s3": ({"storage": {"endpoint": "http://127.0.0.1:9"}}, "is not reachable"),
}


async def run_status(kube: Kube, name: str) -> dict[str, Any]:
    return ((await kube.get("selflearn.dev/v1alpha1", "learnerruns", NS, name)) or {}).get("status") or {}


def _merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for k, v in change.items():
        out[k] = _merged(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


async def bad_inputs(kube: Kube, spec: dict[str, Any]) -> dict[str, float]:
    """A bad image tag, a wrong Secret name, an unreachable S3 endpoint: seconds until each run's
    status says so (the trainer's one line for the last, through its termination message)."""
    seconds: dict[str, float] = {}
    for name, (change, says) in BAD_INPUTS.items():
        bad = _merged(spec, change | {"serving": {"replicas": 0}, "schedule": {"intervalSeconds": 0, "maxRounds": 1}})
        t0 = time.monotonic()
        await kube.create("selflearn.dev/v1alpha1", "learnerruns", NS, {
            "apiVersion": "selflearn.dev/v1alpha1", "kind": "LearnerRun",
            "metadata": {"name": name, "namespace": NS}, "spec": bad})

        async def message(name=name, says=says) -> str | None:
            st = await run_status(kube, name)  # the phase's message, or the Degraded condition's
            lines = [st.get("message") or ""] + [c.get("message") or "" for c in st.get("conditions") or []
                                                 if c.get("type") == "Degraded" and c.get("status") == "True"]
            return next((m for m in lines if says in m), None)

        line = await wait_for(message, timeout=180, what=f"{name}'s status to say {says!r}", interval=1)
        log.info("%s: %s", name, line)
        check("\n" not in line.strip(), f"{name}'s status is one line: {line!r}")
        seconds[name] = round(time.monotonic() - t0, 1)
        await kube.delete("selflearn.dev/v1alpha1", "learnerruns", NS, name)
    return seconds
