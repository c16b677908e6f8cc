"""A small async Kubernetes API client on dicts, sharing its credentials with Kopf.

Credentials come from the pod's service account or a kubeconfig, loaded by the `kubernetes`
package (so exec plugins and OIDC work); requests go out over aiohttp like Kopf's own.
Conventions: a missing object is None (404), `create` returns None when the name is taken (409),
and transient failures (5xx, 429, network) raise kopf.TemporaryError so Kopf retries the handler.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Connection:
    server: str
    token: str | None = None
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False
    default_namespace: str | None = None
    # Where it came from, to load fresh credentials when a token expires.
    kubeconfig: str | None = None
    context: str | None = None
    loaded: bool = False  # False: built by hand (tests), nothing to reload from

    @classmethod
    def load(cls, *, kubeconfig: str | None = None, context: str | None = None) -> "Connection":
        """In-cluster service account when running in a pod (and no kubeconfig is named), else kubeconfig."""
        import kubernetes.client
        import kubernetes.config

        cfg = kubernetes.client.Configuration()
        namespace = None
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=cfg)
            try:
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                    namespace = f.read().strip() or None
            except OSError:
                pass
        else:
            path = kubeconfig or os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
            kubernetes.config.load_kube_config(config_file=os.path.expanduser(path), context=context,
                                               client_configuration=cfg)
            try:
                _, active = kubernetes.config.list_kube_config_contexts(config_file=os.path.expanduser(path))
                namespace = (active.get("context") or {}).get("namespace")
            except Exception:  # noqa: BLE001 - the namespace is only a default
                pass
        header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
        token = header.split(" ", 1)[-1] if header else None
        return cls(server=cfg.host.rstrip("/"), token=token, ca_path=cfg.ssl_ca_cert, cert_path=cfg.cert_file,
                   key_path=cfg.key_file, insecure=not cfg.verify_ssl, default_namespace=namespace,
                   kubeconfig=kubeconfig, context=context, loaded=True)

    def reload(self) -> "Connection":
        """Fresh credentials (a rotated service-account token, a re-run exec plugin)."""
        return Connection.load(kubeconfig=self.kubeconfig, context=self.context) if self.loaded else self

    def kopf_info(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=self.server, token=self.token, scheme="Bearer" if self.token else None,
                                   ca_path=self.ca_path, certificate_path=self.cert_path,
                                   private_key_path=self.key_path, insecure=self.insecure,
                                   default_namespace=self.default_namespace)


def api_path(api_version: str, plural: str, namespace: str | None, name: str | None = None,
             subresource: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


class Kube:
    def __init__(self, connection: Connection, *, timeout: float = 30.0):
        self.connection = connection
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        c = self.connection
        if c.insecure:
            return False
        ctx = ssl.create_default_context(cafile=c.ca_path) if c.ca_path else ssl.create_default_context()
        if c.cert_path and c.key_path:
            ctx.load_cert_chain(c.cert_path, c.key_path)
        return ctx

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": "selflearn-operator"}
            if self.connection.token:
                headers["Authorization"] = f"Bearer {self.connection.token}"
            self._session = aiohttp.ClientSession(
                base_url=self.connection.server, headers=headers, timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=32))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> tuple[int, Any]:
        for attempt in (1, 2):
            session = self._open()
            try:
                async with session.request(method, path, json=body, params=params,
                                           headers={"Content-Type": content_type}) as rsp:
                    try:
                        data = await rsp.json(content_type=None)
                    except (ValueError, aiohttp.ContentTypeError):
                        data = {"message": (await rsp.text())[:300]}
                    status = rsp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                raise kopf.TemporaryError(f"{method} {path}: {err!r}", delay=5) from err
            if status == 401 and attempt == 1:
                # An expired token: load fresh credentials once.
                self.connection = self.connection.reload()
                await self.close()
                continue
            if status == 429 or status >= 500:
                raise kopf.TemporaryError(f"{method} {path}: HTTP {status}: {_message(data)}", delay=5)
            return status, data
        raise KubeError(401, f"{method} {path}: unauthorized")

    async def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict | None:
        status, data = await self.request("GET", api_path(api_version, plural, namespace, name))
        return None if status == 404 else _ok(status, data, f"get {plural}/{name}")

    async def list(self, api_version: str, plural: str, namespace: str | None,
                   label_selector: str | None = None) -> list[dict]:
        params = {"labelSelector": label_selector} if label_selector else None
        status, data = await self.request("GET", api_path(api_version, plural, namespace), params=params)
        return list(_ok(status, data, f"list {plural}").get("items") or [])

    async def create(self, api_version: str, plural: str, namespace: str | None, body: dict) -> dict | None:
        """The created object, or None when one with that name exists already (409)."""
        status, data = await self.request("POST", api_path(api_version, plural, namespace), body=body)
        return None if status == 409 else _ok(status, data, f"create {plural}/{body['metadata']['name']}")

    async def patch(self, api_version: str, plural: str, namespace: str | None, name: str, body: dict,
                    *, subresource: str | None = None) -> dict | None:
        status, data = await self.request("PATCH", api_path(api_version, plural, namespace, name, subresource),
                                          body=body, content_type="application/merge-patch+json")
        return None if status == 404 else _ok(status, data, f"patch {plural}/{name}")

    async def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> bool:
        status, data = await self.request("DELETE", api_path(api_version, plural, namespace, name),
                                          body={"propagationPolicy": "Background"})
        if status == 404:
            return False
        _ok(status, data, f"delete {plural}/{name}")
        return True

    async def apply(self, api_version: str, plural: str, namespace: str, body: dict) -> dict | None:
        """Create, or merge-patch the existing object's labels, annotations and spec to match."""
        created = await self.create(api_version, plural, namespace, body)
        if created is not None:
            return created
        meta = {k: body["metadata"][k] for k in ("labels", "annotations") if k in body["metadata"]}
        update = {"metadata": meta} | {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}
        return await self.patch(api_version, plural, namespace, body["metadata"]["name"], update)


def _message(data: Any) -> str:
    return str(data.get("message") if isinstance(data, dict) else data)[:300]


def _ok(status: int, data: Any, what: str) -> dict:
    if status >= 400:
        raise KubeError(status, f"{what}: {_message(data)}")
    return data if isinstance(data, dict) else {}


class ExistenceCache:
    """Whether an object exists, asked once for many callers: a hit is remembered for `ttl` seconds,
    and concurrent askers share one request (100 runs naming one Secret cost one GET per tick).
    A missing object is asked again every time, so its creation is noticed at once."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._found_at: dict[tuple[str, ...], float] = {}
        self._pending: dict[tuple[str, ...], asyncio.Future[Any]] = {}

    async def exists(self, kube: Kube, api_version: str, plural: str, namespace: str, name: str) -> bool:
        key = (api_version, plural, namespace, name)
        loop = asyncio.get_running_loop()
        if loop.time() - self._found_at.get(key, float("-inf")) < self.ttl:
            return True
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(kube.get(api_version, plural, namespace, name))
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        found = await asyncio.shield(pending) is not None
        if found:
            self._found_at[key] = loop.time()
        return found
