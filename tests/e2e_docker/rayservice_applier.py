"""A test controller that plays KubeRay for one RayService with Docker: it starts the Ray head from the
RayService's own image and env, applies every change of `spec.serveConfigV2` through Ray's REST API
(`PUT /api/serve/applications/` on the dashboard, as KubeRay's controller does), and writes the
RayService's status (the Ready condition KubeRay 1.3+ sets) from `GET /api/serve/applications/`.

One simplification, said plainly: the head container also hosts the model replicas (its `num-cpus`
is the worker group's CPU request), because two Ray nodes on one host network would both bind the
Serve proxy's port 8000. On a cluster KubeRay starts the worker pods instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import requests
import yaml

from selflearn.operator.kube import Kube

from .pods import ConfigError, container_env, docker, image_present, memory_limit, now

log = logging.getLogger("e2e.rayservice")


def _cpus(container: dict[str, Any], default: int = 2) -> int:
    req = ((container.get("resources") or {}).get("requests") or {}).get("cpu")
    try:
        return max(1, int(float(str(req).rstrip("m")) / (1000 if str(req).endswith("m") else 1)))
    except (TypeError, ValueError):
        return default


class RayServiceApplier:
    def __init__(self, kube: Kube, *, namespace: str = "default", dashboard_port: int = 8265,
                 gcs_port: int = 6379, serve_port: int = 8000):
        self.kube, self.namespace = kube, namespace
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.dashboard_port, self.gcs_port, self.serve_port = dashboard_port, gcs_port, serve_port
        self.heads: dict[str, str] = {}  # RayService name -> head container
        self.applied: dict[str, str] = {}  # RayService name -> serveConfigV2 last applied
        self.puts: list[dict[str, Any]] = []  # every PUT: when, the checkpoint it carried

    async def run_forever(self, interval: float = 0.5) -> None:
        while True:
            for rs in await self.kube.list("ray.io/v1", "rayservices", self.namespace):
                try:
                    await self._reconcile(rs)
                except ConfigError as err:
                    await self._status(rs, ready=False, reason="CreateContainerConfigError", message=str(err))
                except (requests.RequestException, RuntimeError) as err:
                    log.warning("RayService %s: %s", rs["metadata"]["name"], err)
            await asyncio.sleep(interval)

    async def close(self, logs_dir: Path | None = None) -> None:
        """Remove the heads; first, with `logs_dir`, keep each head's output and Serve's own logs there."""
        for name, container in self.heads.items():
            if logs_dir is not None:
                out = await docker("logs", "--tail", "400", container, check=False)
                (logs_dir / f"{name}-head.log").write_text(out)
                await docker("cp", f"{container}:/tmp/ray/session_latest/logs/serve", str(logs_dir / f"{name}-serve-logs"),
                             check=False)
            await docker("rm", "-f", container, check=False)

    async def _reconcile(self, rs: dict[str, Any]) -> None:
        name = rs["metadata"]["name"]
        if name not in self.heads:
            await self._start_head(rs)
        config = rs["spec"].get("serveConfigV2") or ""
        if self.applied.get(name) != config:
            body = yaml.safe_load(config)
            r = await asyncio.to_thread(requests.put, f"{self.dashboard}/api/serve/applications/",
                                        json=body, timeout=60)
            if r.status_code >= 300:
                raise RuntimeError(f"PUT /api/serve/applications/: HTTP {r.status_code}: {r.text[:300]}")
            self.applied[name] = config
            self.puts.append({"at": time.time(), "config": body})
            log.info("applied serveConfigV2 of %s", name)
        details = (await asyncio.to_thread(requests.get, f"{self.dashboard}/api/serve/applications/",
                                           timeout=30)).json()
        apps = details.get("applications") or {}
        statuses = {a: v.get("status") for a, v in apps.items()}
        ready = bool(apps) and all(s == "RUNNING" for s in statuses.values())
        await self._status(rs, ready=ready, reason="Running" if ready else "Deploying",
                           message=json.dumps(statuses, sort_keys=True))

    async def _start_head(self, rs: dict[str, Any]) -> None:
        name = rs["metadata"]["name"]
        cluster = rs["spec"]["rayClusterConfig"]
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        workers = cluster.get("workerGroupSpecs") or []
        cpus = sum(_cpus(w["template"]["spec"]["containers"][0]) * int(w.get("replicas", 1)) for w in workers) or 2
        if not image_present(head["image"]):
            raise ConfigError(f'image "{head["image"]}" not present and no registry to pull it from')
        env = await container_env(self.kube, self.namespace, head)
        container = f"e2e-{name}-head"
        params = dict(cluster["headGroupSpec"].get("rayStartParams") or {})
        params.update({"num-cpus": str(cpus), "port": str(self.gcs_port),
                       "dashboard-port": str(self.dashboard_port), "dashboard-host": "127.0.0.1"})
        args = ["run", "-d", "--name", container, "--network", "host", "--shm-size", "1g"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        if mem := memory_limit(workers[0]["template"]["spec"]["containers"][0] if workers else head):
            args += ["--memory", mem]
        ray = ["ray", "start", "--head", "--block", "--disable-usage-stats",
               *[f"--{k}={v}" for k, v in params.items()]]
        await docker("rm", "-f", container, check=False)
        await docker(*args, head["image"], *ray)
        self.heads[name] = container
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if (await asyncio.to_thread(requests.get, f"{self.dashboard}/api/version", timeout=5)).ok:
                    break
            except requests.RequestException:
                pass
            await asyncio.sleep(1)
        else:
            raise RuntimeError(f"the Ray head {container} did not answer on {self.dashboard}")
        log.info("Ray head %s is up", container)
        await self._status(rs, ready=False, reason="Deploying", message="head started")

    async def _status(self, rs: dict[str, Any], *, ready: bool, reason: str, message: str) -> None:
        want = {"type": "Ready", "status": "True" if ready else "False", "reason": reason, "message": message}
        have = next((c for c in (rs.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {})
        if all(have.get(k) == v for k, v in want.items()):
            return
        status = {"conditions": [want | {"lastTransitionTime": now()}],
                  "serviceStatus": "Running" if ready else ""}
        await self.kube.patch("ray.io/v1", "rayservices", self.namespace, rs["metadata"]["name"],
                              {"status": status}, subresource="status")

    def replicas(self) -> dict[str, list[tuple[str, int]]]:
        """Deployment -> [(replica id, pid)] of the running replicas, from the REST API."""
        apps = requests.get(f"{self.dashboard}/api/serve/applications/", timeout=30).json().get("applications") or {}
        out: dict[str, list[tuple[str, int]]] = {}
        for app in apps.values():
            for dname, dep in (app.get("deployments") or {}).items():
                out[dname] = sorted((r.get("replica_id"), r.get("pid")) for r in dep.get("replicas") or []
                                    if r.get("state") == "RUNNING")
        return out
