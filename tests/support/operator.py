"""Run the operator against an in-memory Kubernetes: for tests and bench/operator_scale.py.

- `ClusterEmulator`: kmock's KubernetesEmulator, closer to a real API server where the operator
  relies on it: uid, resourceVersion, creationTimestamp and generation (bumped on spec changes),
  generateName, 422 (not 500) when a JSON-patch `test` op fails, as Kopf expects, and watches that
  resume from a list's resourceVersion; it forgets past requests (but not the credentials used), so it stays fast.
- `operator_task(url, config=...)`: the operator in-process, as `kopf.testing.KopfTask` (a minimal
  stand-in while the installed Kopf lacks it).
- `Cluster`: what the tests do to that API: create objects, and play the Job controller, which
  the emulator does not have (a pod with the trainer's termination message, then Job status).

Needs the test extras (kmock, and its private `_internal` for KubernetesError), which is why it
lives under tests/ and not in the package. `python -m tests.support.operator` (from the repository
root) serves the emulator alone, for bench/operator_scale.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Literal

import aiohttp.web
import attrs
import jsonpatch
import kopf
import kopf.testing
from kmock import KubernetesEmulator, ResourceInfo, Server, action
from kmock._internal.k8s import KubernetesError

from selflearn.operator.crd import GROUP, PLURAL, VERSION
from selflearn.operator.handlers import OperatorConfig, build_registry, make_settings
from selflearn.operator.kube import Connection, Kube
from selflearn.operator.resources import TRAINER_CONTAINER

LEARNERRUNS = (f"{GROUP}/{VERSION}", PLURAL)
RESOURCES: dict[str, dict[str, Any]] = {
    f"{GROUP}/{VERSION}/{PLURAL}": dict(kind="LearnerRun", namespaced=True, subresources={"status"}),
    "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources={"status"}),
    "v1/pods": dict(kind="Pod", namespaced=True, subresources={"status"}),
    "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
    "v1/services": dict(kind="Service", namespaced=True),
    "v1/secrets": dict(kind="Secret", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "ray.io/v1/rayservices": dict(kind="RayService", namespaced=True, subresources={"status"}),
    "networking.k8s.io/v1/ingresses": dict(kind="Ingress", namespaced=True),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition", namespaced=False),
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class ClusterEmulator(KubernetesEmulator):
    authorizations: set[str | None] = attrs.field(factory=set, init=False)
    _rv: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = ResourceInfo(verbs=VERBS, **info)

    def _current(self, request: Any) -> dict[str, Any]:
        key = (request.resource, request.namespace, request.name)
        try:
            obj = self.objects[key]
            return {} if obj.deleted else obj.raw
        except (KeyError, ValueError):
            return {}

    def _stamp(self, request: Any) -> None:
        self._rv += 1
        rv = str(self._rv)
        data = request.data
        if request.action == action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = rv
        elif request.action == action.UPDATE:
            touches_spec = request.subresource is None and (
                "spec" in data if isinstance(data, dict) else
                any(str(op.get("path", "")).startswith("/spec") for op in data if isinstance(op, dict)))
            generation = None
            if touches_spec:
                generation = int((self._current(request).get("metadata") or {}).get("generation") or 0) + 1
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {}) or {}
                data["metadata"] = meta
                meta["resourceVersion"] = rv
                if generation:
                    meta["generation"] = generation
            elif isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
                if generation:
                    data.append({"op": "add", "path": "/metadata/generation", "value": generation})

    async def _serve_list(self, request: Any) -> Any:
        # Like the base, plus the list's resourceVersion, which Kopf passes on to its watch.
        async with self._lock:
            rv = str(self._rv)
        data = await super()._serve_list(request)
        data["metadata"]["resourceVersion"] = rv
        return data

    async def _serve_watch(self, request: Any) -> Any:
        # Like the base, but a watch from a list's resourceVersion replays only what changed since
        # (a real API server never re-sends what the list returned), and nothing is lost between
        # the replay and the live stream.
        yield b""
        since = request.params.get("resourceVersion", "")
        since_n = int(since) if since.isdigit() else -1
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            objs = self._KubernetesEmulator__get_objs(request, strict=False)
            replay = [{"type": "ADDED", "object": o.raw} for o in objs if not o.deleted
                      and int((o.raw.get("metadata") or {}).get("resourceVersion") or 0) > since_n]
        try:
            for event in replay:
                yield event
            async for event in bus.stream(since=marker):
                meta = (event.get("object") or {}).get("metadata") or {}
                if self._KubernetesEmulator__check(request, request.resource, meta.get("namespace"),
                                                   meta.get("name"), strict=False):
                    yield event
        finally:
            await bus.unmark(marker)

    async def __call__(self, raw_request: Any) -> Any:
        # kmock cannot parse the cluster-scoped path /api/v1/namespaces (it expects a namespace after
        # it), and Kopf lists and watches namespaces when it scans the cluster, as the real operator
        # (`selflearn operator`, not the in-process one) does. Answer it here: "default" only.
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            if raw_request.query.get("watch") in ("true", "1"):
                resp = aiohttp.web.StreamResponse()
                await resp.prepare(raw_request)
                await asyncio.sleep(min(float(raw_request.query.get("timeoutSeconds") or 60), 600))
                return resp
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": str(self._rv)},
                "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}]})
        return await super().__call__(raw_request)

    async def _handle(self, request: Any) -> Any:
        # kmock matches each request against its whole request history (kept for assertions);
        # with thousands of requests that is quadratic. Keep the current one only; remember who called.
        del self._requests[:-1]
        self.authorizations.add(request.headers.get("Authorization"))
        if request.resource is not None and request.action in (action.CREATE, action.UPDATE) and request.data:
            self._stamp(request)
        try:
            return await super()._handle(request)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as err:
            raise KubernetesError(status=422, reason="Invalid", message=str(err)) from None


class _KopfTask:
    """What `kopf.testing.KopfTask` does (Kopf > 1.45): the operator as a background asyncio task."""

    def __init__(self, *, timeout: float | None = 10, **operator_kwargs: Any):
        self._kwargs = operator_kwargs
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.timeout = timeout

    async def __aenter__(self) -> "_KopfTask":
        self._task = asyncio.create_task(kopf.operator(stop_flag=self._stop, **self._kwargs))
        return self

    async def __aexit__(self, *exc: Any) -> Literal[False]:
        assert self._task is not None
        self._stop.set()
        done, _ = await asyncio.wait({self._task}, timeout=self.timeout)
        if not done:
            self._task.cancel()
            raise RuntimeError("the operator did not stop")
        if not self._task.cancelled() and self._task.exception() and not exc[1]:
            raise self._task.exception()  # type: ignore[misc]
        return False


KopfTask = getattr(kopf.testing, "KopfTask", _KopfTask)


def operator_task(url: str, *, config: OperatorConfig, namespaces: tuple[str, ...] = ("default",)) -> Any:
    """The operator, in-process, against the API at `url`, as a `async with` block."""
    settings = make_settings()
    settings.scanning.disabled = True  # no CRD objects in the emulator; resources are declared up front
    settings.watching.reconnect_backoff = 0.05
    memo = kopf.Memo(connection=Connection(server=url), config=config)
    return KopfTask(registry=build_registry(config), settings=settings, standalone=True,
                    namespaces=list(namespaces), memo=memo)


class Cluster:
    """The test's hands on the emulated API (through HTTP, so the operator's watches see it all)."""

    def __init__(self, emulator: EmulatorThread):
        self.emulator = emulator
        self.url = emulator.url
        self.api = Kube(Connection(server=self.url))

    async def close(self) -> None:
        await self.api.close()

    # reading: straight from the emulator's memory --------------------------------------------------
    def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        for obj in self.list(api_version, plural, namespace):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def list(self, api_version: str, plural: str, namespace: str) -> list[dict[str, Any]]:
        group, _, version = api_version.rpartition("/")

        def snapshot() -> list[dict[str, Any]]:
            return [json.loads(json.dumps(obj.raw, default=dict))
                    for (resource, ns, _name), obj in self.emulator.emulator.objects.items()
                    if (resource.group, resource.version, resource.plural) == (group, version, plural)
                    and ns == namespace and not obj.deleted]
        return self.emulator.call(snapshot)

    def learnerrun(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.get(*LEARNERRUNS, namespace, name) or {}

    def jobs(self, run: str, namespace: str = "default") -> dict[str, dict[str, Any]]:
        return {j["metadata"]["name"]: j for j in self.list("batch/v1", "jobs", namespace)
                if (j["metadata"].get("labels") or {}).get("selflearn.dev/run") == run}

    def events(self, namespace: str = "default") -> list[dict[str, Any]]:
        return self.list("v1", "events", namespace)

    # writing --------------------------------------------------------------------------------------------
    async def create_learnerrun(self, name: str, spec: dict[str, Any], namespace: str = "default") -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LearnerRun",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        created = await self.api.create(*LEARNERRUNS, namespace, body)
        assert created is not None, f"LearnerRun {name} exists"
        return created

    async def patch_spec(self, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
        await self.api.patch(*LEARNERRUNS, namespace, name, {"spec": spec})

    async def finish_job(self, name: str, *, result: dict[str, Any] | None = None, succeeded: bool = True,
                         log_tail: str | None = None, messages: list[str] | None = None,
                         namespace: str = "default") -> None:
        """Play the Job controller: the pods (one per index of an Indexed Job) end with the trainer's
        termination message (`messages`: each pod's, in the order they ended, a second apart), then
        the Job gets its Complete or Failed condition."""
        job = self.get("batch/v1", "jobs", namespace, name)
        assert job is not None, f"no Job {name}"
        message = log_tail if log_tail is not None else json.dumps(result) if result is not None else ""
        indexed = job["spec"].get("completionMode") == "Indexed"
        count = job["spec"].get("completions", 1) if indexed else 1
        messages = messages or [message] * count
        start = datetime.now(timezone.utc)
        for index, text in enumerate(messages):
            ended = (start + timedelta(seconds=index)).strftime("%Y-%m-%dT%H:%M:%SZ")
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-{index}-{uuid.uuid4().hex[:5]}" if indexed else
                             f"{name}-{uuid.uuid4().hex[:5]}", "namespace": namespace,
                             "labels": {"batch.kubernetes.io/job-name": name, "job-name": name,
                                        **({"batch.kubernetes.io/job-completion-index": str(index)}
                                           if indexed else {})},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                  "uid": job["metadata"]["uid"], "controller": True}]},
                "spec": job["spec"]["template"]["spec"],
                "status": {"phase": "Succeeded" if succeeded else "Failed", "containerStatuses": [{
                    "name": TRAINER_CONTAINER, "ready": False, "restartCount": 0, "image": "trainer",
                    "imageID": "", "state": {"terminated": {
                        "exitCode": 0 if succeeded else 1, "reason": "Completed" if succeeded else "Error",
                        "message": text, "startedAt": ended, "finishedAt": ended}}}]},
            }
            await self.api.create("v1", "pods", namespace, pod)
        now = _now()
        if succeeded:
            status = {"succeeded": len(messages), "completionTime": now, "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}
        else:
            why = ("PodFailurePolicy", f"Container {TRAINER_CONTAINER} for pod {namespace}/{name}-0 failed with "
                   "exit code 1 matching FailJob rule at index 2") if indexed else \
                ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
            status = {"failed": len(messages) if indexed else job["spec"].get("backoffLimit", 0) + 1, "conditions": [
                {"type": "FailureTarget", "status": "True"},
                {"type": "Failed", "status": "True", "reason": why[0], "message": why[1]}]}
        await self.api.patch("batch/v1", "jobs", namespace, name, {"status": status}, subresource="status")


def published(run: str, round_: int, *, before: float = 20.0, after: float = 19.0,
              fresh: tuple[float, float] | None = None, storage: str = "s3://ckpt/runs") -> dict[str, Any]:
    """The trainer's result line for a published round (contracts.RoundResult), with the metrics a
    round of the default spec measures (chatEval on): chat manners kept, knowledge up, and the
    fresh articles' perplexity only when `fresh` is given (else no article was held out)."""
    ppl: dict[str, Any] = {"general": {"before": before, "after": after}}
    if fresh:
        ppl["fresh"] = {"before": fresh[0], "after": fresh[1]}
    metrics = {"train_loss": 2.5, "ppl": ppl, "held_out": 2 if fresh else 0,
               "chat": {"format_ok": {"before": 1.0, "after": 1.0}, "retention": 1.0},
               "knowledge": {"learned": {"before": 0.2, "after": 0.3}, "asked": {"learned": 3}}}
    return {"status": "published", "round": round_, "checkpoint": f"{storage}/{run}/r{round_:06d}",
            "id": f"{run}/r{round_:06d}", "parent": None, "metrics": metrics}


async def eventually(probe: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05,
                     what: str = "") -> Any:
    """Poll `probe` until it returns something truthy; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}: last {value!r}")
        await asyncio.sleep(interval)


class EmulatorThread:
    """The emulated API server in its own thread and event loop, like a real one elsewhere.

    (Kopf's shutdown cancels every task born in its loop after it started, which would include an
    in-loop server's connection handlers.)"""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.emulator = ClusterEmulator()
        self.server = Server(self.emulator)
        self.loop.run_until_complete(self.emulator.__aenter__())
        self.loop.run_until_complete(self.server.__aenter__())
        self.url = str(self.server.url).rstrip("/")
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.__aexit__(None, None, None))
        self.loop.run_until_complete(self.emulator.__aexit__(None, None, None))
        self.loop.close()

    def start(self) -> "EmulatorThread":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the emulator's loop (its objects are not thread-safe) and return the result."""
        async def wrapper() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)


__all__ = ["Cluster", "ClusterEmulator", "EmulatorThread", "KopfTask", "eventually", "operator_task", "published"]


def main() -> None:
    """Serve an emulated Kubernetes API until stdin closes; print its URL first (for bench/)."""
    import sys

    api = EmulatorThread().start()
    print(api.url, flush=True)
    try:
        sys.stdin.read()
    finally:
        api.stop()


if __name__ == "__main__":
    main()
