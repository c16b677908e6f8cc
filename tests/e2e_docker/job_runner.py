"""A test controller that plays Kubernetes' Job controller and kubelet with Docker: each new Job's pod
template runs as a container (image, command, args, env, envFrom Secret, the ConfigMap, emptyDir and
PersistentVolumeClaim mounts with the pod's fsGroup, the termination message, the memory limit), and the Pod and Job status are written back as a
cluster would: a Pod per attempt ending in `terminated` with the message, then the Job's Complete or
Failed condition (backoffLimit, podFailurePolicy's FailJob exit codes, activeDeadlineSeconds).
An Indexed Job runs its pods side by side (JOB_COMPLETION_INDEX, and the names its headless
Service would give them, `<job>-<index>.<subdomain>`, mapped to this host with --add-host: the
containers share the host's network), and ends when every index succeeded or one failed.

A missing image or Secret leaves the pod waiting (ErrImageNeverPull, CreateContainerConfigError)
and the Job active, as on a cluster; the operator is the one who must say so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from selflearn.operator.kube import Kube

from .pods import ConfigError, container_env, cpu_limit, docker, image_present, memory_limit, now, waiting_status

log = logging.getLogger("e2e.job-runner")


class JobRunner:
    def __init__(self, kube: Kube, *, namespace: str = "default", network: str = "host",
                 volumes_dir: Path | None = None):
        self.kube, self.namespace, self.network = kube, namespace, network
        # Where bound PersistentVolumeClaims keep their data from one pod to the next.
        self.volumes_dir = volumes_dir or Path(tempfile.mkdtemp(prefix="e2e-pvcs-"))
        self.started: set[str] = set()
        self.tasks: list[asyncio.Task] = []
        self.runs: list[dict[str, Any]] = []  # one per pod: job, exit code, seconds

    async def run_forever(self, interval: float = 0.5) -> None:
        while True:
            for job in await self.kube.list("batch/v1", "jobs", self.namespace):
                uid = job["metadata"]["uid"]
                if uid not in self.started and not (job.get("status") or {}).get("conditions"):
                    self.started.add(uid)
                    self.tasks.append(asyncio.create_task(self._run_job(job)))
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _run_job(self, job: dict[str, Any]) -> None:
        name, spec = job["metadata"]["name"], job["spec"]
        deadline = spec.get("activeDeadlineSeconds")
        indexes = range(spec.get("completions", 1)) if spec.get("completionMode") == "Indexed" else [None]
        t0 = time.monotonic()
        failed = 0
        while True:
            try:
                codes = await asyncio.wait_for(asyncio.gather(*(self._run_pod(job, i) for i in indexes)),
                                               timeout=deadline - (time.monotonic() - t0) if deadline else None)
            except asyncio.TimeoutError:
                await self._finish(name, ok=False, failed=failed + 1, reason="DeadlineExceeded",
                                   message="Job was active longer than specified deadline")
                return
            if any(code is None for code in codes):  # a pod could not start: it waits, and so does the Job
                return
            bad = [(i, code) for i, code in zip(indexes, codes) if code != 0]
            if not bad:
                await self._finish(name, ok=True, succeeded=len(codes))
                return
            failed += len(bad)
            index, code = bad[0]
            if _fails_job(spec, code):
                await self._finish(name, ok=False, failed=failed, reason="PodFailurePolicy",
                                   message=f"Container trainer for pod failed with exit code {code} matching "
                                           f"FailJob rule" + (f" at index {index}" if index is not None else ""))
                return
            if failed > spec.get("backoffLimit", 6):
                await self._finish(name, ok=False, failed=failed, reason="BackoffLimitExceeded",
                                   message="Job has reached the specified backoff limit")
                return

    async def _finish(self, name: str, *, ok: bool, failed: int = 0, reason: str = "", message: str = "",
                      succeeded: int = 1) -> None:
        if ok:
            status = {"succeeded": succeeded, "completionTime": now(), "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}
        else:
            status = {"failed": failed, "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason},
                {"type": "Failed", "status": "True", "reason": reason, "message": message}]}
        await self.kube.patch("batch/v1", "jobs", self.namespace, name, {"status": status}, subresource="status")

    async def _run_pod(self, job: dict[str, Any], index: int | None = None) -> int | None:
        """One attempt: the Pod object, the container, its end. None: it cannot start (it waits).
        `index`: the pod's completion index in an Indexed Job."""
        jname = job["metadata"]["name"]
        pod_spec = job["spec"]["template"]["spec"]
        (c,) = pod_spec["containers"]
        pod_name = f"{jname}-{uuid.uuid4().hex[:5]}" if index is None else f"{jname}-{index}-{uuid.uuid4().hex[:5]}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "namespace": self.namespace,
                            "labels": dict(job["spec"]["template"]["metadata"].get("labels") or {})
                            | {"batch.kubernetes.io/job-name": jname, "job-name": jname}
                            | ({"batch.kubernetes.io/job-completion-index": str(index)} if index is not None else {}),
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": jname,
                                                 "uid": job["metadata"]["uid"], "controller": True}]},
               "spec": pod_spec, "status": {"phase": "Pending"}}
        await self.kube.create("v1", "pods", self.namespace, pod)

        async def set_status(status: dict[str, Any]) -> None:
            await self.kube.patch("v1", "pods", self.namespace, pod_name, {"status": status}, subresource="status")

        if not image_present(c["image"]):
            # imagePullPolicy IfNotPresent with no registry: what a kubelet reports when it cannot pull.
            await set_status(waiting_status(c["name"], "ErrImagePull",
                                            f'image "{c["image"]}" not present and no registry to pull it from'))
            return None
        try:
            env = await container_env(self.kube, self.namespace, c)
        except ConfigError as err:
            await set_status(waiting_status(c["name"], "CreateContainerConfigError", str(err)))
            return None

        work = Path(tempfile.mkdtemp(prefix=f"e2e-{pod_name}-"))
        try:
            try:
                args = await self._mounts(pod_spec, c, work)
            except ConfigError as err:  # a missing ConfigMap: the kubelet's FailedMount, the pod waits
                await set_status(waiting_status(c["name"], "CreateContainerConfigError", str(err)))
                return None
            term = work / "termination-log"
            term.touch()
            term.chmod(0o666)
            args += ["-v", f"{term}:{c.get('terminationMessagePath', '/dev/termination-log')}"]
            for k, v in env.items():
                args += ["-e", f"{k}={v}"]
            if mem := memory_limit(c):
                args += ["--memory", mem]
            if cpus := cpu_limit(c):
                args += ["--cpus", cpus]
            if index is not None:
                args += ["-e", f"JOB_COMPLETION_INDEX={index}"]
                if sub := pod_spec.get("subdomain"):  # the headless Service's names for every index
                    for k in range(job["spec"]["completions"]):
                        args += ["--add-host", f"{jname}-{k}.{sub}:127.0.0.1"]
                # A pod's /etc/hosts names the pod itself (the ranks' process group resolves it);
                # on the host's network that name is the host's.
                args += ["--add-host", f"{socket.gethostname()}:127.0.0.1"]
            # The kubelet's $(VAR) expansion in command and args, from the container's environment.
            expand = {**env, **({"JOB_COMPLETION_INDEX": str(index)} if index is not None else {})}
            cmd = [re.sub(r"\$\((\w+)\)", lambda m: expand.get(m[1], m[0]), a) for a in c.get("command") or []]
            argv = ["run", "--name", pod_name, "--network", self.network, *args]
            argv += (["--entrypoint", cmd[0], c["image"], *cmd[1:]] if cmd else [c["image"]]) + list(c.get("args") or [])
            started = now()
            await set_status({"phase": "Running", "startTime": started, "containerStatuses": [{
                "name": c["name"], "ready": True, "restartCount": 0, "image": c["image"], "imageID": "",
                "state": {"running": {"startedAt": started}}}]})
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec("docker", *argv, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
            try:
                code = await proc.wait()
            except asyncio.CancelledError:
                await docker("rm", "-f", pod_name, check=False)
                raise
            seconds = time.monotonic() - t0
            message = term.read_text(errors="replace").strip()
            if not message and code and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = "\n".join((await docker("logs", "--tail", "80", pod_name, check=False)).splitlines()[-80:])
            await docker("rm", "-f", pod_name, check=False)
            self.runs.append({"job": jname, "pod": pod_name, "exit_code": code, "seconds": round(seconds, 1)})
            log.info("pod %s exited %s after %.0f s", pod_name, code, seconds)
            await set_status({"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [{
                "name": c["name"], "ready": False, "restartCount": 0, "image": c["image"], "imageID": "",
                "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                         "message": message[-4096:], "startedAt": started, "finishedAt": now()}}}]})
            return code
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _mounts(self, pod_spec: dict[str, Any], c: dict[str, Any], work: Path) -> list[str]:
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        fs_group = (pod_spec.get("securityContext") or {}).get("fsGroup")
        args: list[str] = []
        for m in c.get("volumeMounts") or []:
            vol = volumes[m["name"]]
            if claim := vol.get("persistentVolumeClaim"):
                if await self.kube.get("v1", "persistentvolumeclaims", self.namespace, claim["claimName"]) is None:
                    raise ConfigError(f'persistentvolumeclaim "{claim["claimName"]}" not found')
                host = self.volumes_dir / claim["claimName"]  # outlives the pod, like the volume
                host.mkdir(parents=True, exist_ok=True)
                if fs_group is not None:  # the kubelet's fsGroup: group-owned, group-writable, setgid
                    os.chown(host, -1, fs_group)
                    host.chmod(0o2775)
                args += ["-v", f"{host}:{m['mountPath']}"]
                continue
            host = work / "volumes" / m["name"]
            host.mkdir(parents=True, exist_ok=True)
            if cm := vol.get("configMap"):
                obj = await self.kube.get("v1", "configmaps", self.namespace, cm["name"])
                if obj is None:
                    raise ConfigError(f'configmap "{cm["name"]}" not found')
                for key, value in (obj.get("data") or {}).items():
                    (host / key).write_text(value)
                    (host / key).chmod(0o644)
            host.chmod(0o755 if vol.get("configMap") else 0o1777)  # emptyDir: writable by the pod's user
            args += ["-v", f"{host}:{m['mountPath']}" + (":ro" if m.get("readOnly") else "")]
        if fs_group is not None:  # and the group is one of the container's supplementary groups
            args += ["--group-add", str(fs_group)]
        return args


def _fails_job(spec: dict[str, Any], code: int) -> bool:
    """Whether exit `code` matches one of the Job's podFailurePolicy FailJob rules (In / NotIn)."""
    for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
        on = rule.get("onExitCodes") or {}
        if rule.get("action") != "FailJob" or not on:
            continue
        values = set(on.get("values") or [])
        if (code in values) == (on.get("operator", "In") == "In"):
            return True
    return False
