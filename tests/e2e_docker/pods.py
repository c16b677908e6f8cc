"""What both test controllers do with a pod template: resolve its env the way the kubelet does, and
turn a container into a `docker run` command line. A missing Secret or ConfigMap is the kubelet's
CreateContainerConfigError, raised here as `ConfigError` with the kubelet's own wording."""

from __future__ import annotations

import asyncio
import base64
import subprocess
from datetime import datetime, timezone
from typing import Any

from selflearn.operator.kube import Kube


class ConfigError(Exception):
    """A container's config refers to something that is not there (CreateContainerConfigError)."""


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _data(kube: Kube, kind: str, namespace: str, name: str, *, optional: bool) -> dict[str, str] | None:
    plural = "secrets" if kind == "secret" else "configmaps"
    obj = await kube.get("v1", plural, namespace, name)
    if obj is None:
        if optional:
            return None
        raise ConfigError(f'{kind} "{name}" not found')
    if kind == "secret":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} | \
            dict(obj.get("stringData") or {})
    return dict(obj.get("data") or {})


async def container_env(kube: Kube, namespace: str, container: dict[str, Any]) -> dict[str, str]:
    """envFrom first, then env (env wins), as the kubelet builds it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        for kind, key in (("secret", "secretRef"), ("configmap", "configMapRef")):
            if ref := source.get(key):
                data = await _data(kube, kind, namespace, ref["name"], optional=bool(ref.get("optional")))
                env.update({source.get("prefix", "") + k: v for k, v in (data or {}).items()})
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = (var.get("valueFrom") or {})
        for kind, key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
            if r := ref.get(key):
                data = await _data(kube, kind, namespace, r["name"], optional=bool(r.get("optional")))
                if data is not None and r["key"] in data:
                    env[var["name"]] = data[r["key"]]
                elif not r.get("optional"):
                    raise ConfigError(f'couldn\'t find key {r["key"]} in {kind} {namespace}/{r["name"]}')
    return env


def image_present(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def memory_limit(container: dict[str, Any]) -> str | None:
    """A Kubernetes memory quantity as docker's --memory (Gi/Mi -> g/m)."""
    q = str(((container.get("resources") or {}).get("limits") or {}).get("memory") or "")
    for suffix, unit in (("Gi", "g"), ("Mi", "m"), ("G", "g"), ("M", "m")):
        if q.endswith(suffix):
            return q[: -len(suffix)] + unit
    return q or None


def cpu_limit(container: dict[str, Any]) -> str | None:
    """A Kubernetes CPU quantity as docker's --cpus ("500m" -> "0.5")."""
    q = str(((container.get("resources") or {}).get("limits") or {}).get("cpu") or "")
    return str(int(q[:-1]) / 1000) if q.endswith("m") else q or None


async def docker(*args: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec("docker", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if check and proc.returncode:
        raise RuntimeError(f"docker {' '.join(args[:3])} ...: exit {proc.returncode}: {text.strip()[-400:]}")
    return text


def waiting_status(name: str, reason: str, message: str) -> dict[str, Any]:
    return {"phase": "Pending", "containerStatuses": [{
        "name": name, "ready": False, "restartCount": 0, "image": "", "imageID": "",
        "state": {"waiting": {"reason": reason, "message": message}}}]}
