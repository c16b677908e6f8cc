"""Ray Serve application: `ChatModel` (engine + hot swap) behind `ChatIngress` (FastAPI).

KubeRay RayService (serveConfigV2)::

    applications:
      - name: selflearn
        route_prefix: /
        import_path: selflearn.serving.app:app_builder
        args: {api_key_env: SELFLEARN_API_KEY, rate_limit_per_minute: 60, feedback_uri: s3://b/p/.feedback}
        deployments:
          - name: ChatModel
            user_config:                      # changing it hot-swaps replicas in place
              checkpoint: s3://bucket/prefix/wiki-en/r000007     # null: the base model
              base_model: embedded:smollm2-135m-instruct
              storage_endpoint: http://minio:9000                # optional; creds from AWS_* env
              storage_region: us-east-1                          # optional
              generation: {temperature: 0.7, top_p: 0.9, top_k: 50, max_length: 128,
                           repetition_penalty: 1.1}

`args` are `config.ServeSettings` (every key optional); `args.user_config` is the initial user_config
when the deployment override does not give one.

One machine (what `selflearn serve` and `selflearn local` use)::

    from selflearn.serving.app import start_local
    server = start_local(port=8000, user_config={"checkpoint": "file:///abs/store/local/r000003"},
                         args={"state_file": "/abs/.selflearn/local-state.json", "dashboard_dir": "/abs/web"})
    server.update_checkpoint({"checkpoint": "file:///abs/store/local/r000004"})  # in-place reconfigure
    server.wait_for_checkpoint("local/r000004", timeout=300)                      # optional
    server.status()          # the replica's EngineStatus (weights.checkpoint, weights.degraded, counters, ...)
    server.shutdown()

`start_local` starts (or joins) a local Ray, starts Serve with HTTP on host:port, and applies the
same declarative config a RayService would (import path + args + the ChatModel user_config), so
`update_checkpoint` is exactly KubeRay's in-place update: Serve calls `reconfigure()` on the live
replicas. The driver's pages: `args.dashboard_dir` is served at /dashboard and `args.state_file`
(JSON) at GET /api/rounds, behind the same API key as the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncGenerator, cast

from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from ..contracts import Completion, EngineEvent, EngineRequest, EngineStatus
from . import deployment
from .config import EngineOptions, ServeSettings, initial_user_config, parse_model_config, parse_settings
from .deployment import APP_NAME

log = logging.getLogger(__name__)


@serve.deployment(name=deployment.MODEL_DEPLOYMENT, health_check_period_s=10, health_check_timeout_s=60,
                  graceful_shutdown_timeout_s=60)
class ChatModel:
    """One model replica: the engine, its hot swap, and a stream of events per request."""

    def __init__(self, engine_options: dict[str, Any] | None = None):
        from .engine import Engine

        self.engine = Engine(EngineOptions.model_validate(engine_options or {}))
        self._configured = False

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve calls this at start and on every user_config change.

        A bad config or a failed load never raises: it is recorded (status, /metrics: degraded,
        with the reason) and the replica keeps the weights it has. At start it has none: it stays
        up and unready (/readyz 503) and retries, or with `engine.allow_base_fallback` serves the
        base model, still degraded. Raising here would fail the replica's start, and Serve would
        start another that fails the same way.

        The first call loads synchronously (the replica is not routed to yet). Later calls return
        at once: Serve takes a replica out of routing while reconfigure runs, so the new weights
        load on a background thread while the current ones keep answering.
        """
        if not self._configured:
            self._configured = True
            await asyncio.to_thread(self.engine.configure, user_config, wait=True)
        else:
            self.engine.configure(user_config, wait=False)

    async def chat_stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        """Engine events for one request: start, token..., done | error."""
        from .backend import stream_events

        events = stream_events(self.engine, request)
        try:
            async for ev in events:
                yield ev
        finally:  # cancelled by the caller: cancel the engine request too
            await events.aclose()

    async def chat(self, request: EngineRequest) -> Completion:
        """The whole answer at once: its start event and its done or error event."""
        from .backend import complete

        return await complete(self.engine, request)

    async def status(self) -> EngineStatus:
        return self.engine.status()

    async def check_health(self) -> None:
        """Serve replaces a replica whose health check raises: only faults a restart mends raise
        (a dead scheduler, a stuck step). Weights that failed to load do not; see Engine.check_health."""
        if not self._configured:  # deployed without a user_config: load the defaults now
            await self.reconfigure({})
        self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class ServeBackend:
    """What the HTTP API needs, over the ChatModel deployment handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        gen = cast(DeploymentResponseGenerator, self.handle.options(stream=True).chat_stream.remote(request))
        finished = False
        try:
            async for ev in gen:
                yield ev
            finished = True
        finally:
            if not finished:
                gen.cancel()  # client gone or timed out: free the batch slot

    async def complete(self, request: EngineRequest) -> Completion:
        response = self.handle.chat.remote(request)
        try:
            return await response
        except asyncio.CancelledError:  # timed out or the client left: free the batch slot
            response.cancel()
            raise

    async def status(self) -> EngineStatus:
        return await self.handle.status.remote()


@serve.deployment(name=deployment.INGRESS_DEPLOYMENT)
@serve.ingress()
class ChatIngress:
    """FastAPI ingress; the app itself is built per replica from the settings (serving.http.build_api)."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]):
        self._settings = ServeSettings.model_validate(settings)
        self._backend = ServeBackend(model)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from .http import build_api

        return build_api(self._backend, self._settings)


def app_builder(args: dict[str, Any] | None = None) -> Application:
    """RayService / `serve run` entry point: `selflearn.serving.app:app_builder` with `args`."""
    settings = parse_settings(args)
    user_config = initial_user_config(settings)
    parse_model_config(user_config)  # fail the deploy on a malformed initial config
    engine = settings.engine
    # The decorators made both classes Deployments; mypy keeps a decorated class's own type.
    model = cast(Deployment, ChatModel).options(
        num_replicas=settings.model_replicas, user_config=user_config,
        # The engine queues and batches itself; let Serve hand it everything up to its own cap.
        max_ongoing_requests=engine.max_batch_size + engine.max_queue,
        ray_actor_options={"num_cpus": settings.model_num_cpus},
    ).bind(engine.model_dump())
    return cast(Deployment, ChatIngress).options(
        num_replicas=settings.ingress_replicas, max_ongoing_requests=settings.max_inflight + 64,
        ray_actor_options={"num_cpus": 0},
    ).bind(model, settings.model_dump())


# -- one machine -------------------------------------------------------------------------------------
def serve_config(*, port: int, host: str = "127.0.0.1", user_config: dict[str, Any] | None = None,
                 args: dict[str, Any] | None = None, app_name: str = APP_NAME,
                 route_prefix: str = "/") -> dict[str, Any]:
    """A declarative Serve config (the shape of a RayService's serveConfigV2) for one application."""
    return {"http_options": {"host": host, "port": port}, "controller_options": deployment.controller_options(),
            "applications": [application(user_config=user_config, args=args, app_name=app_name,
                                         route_prefix=route_prefix)]}


def application(*, user_config: dict[str, Any] | None = None, args: dict[str, Any] | None = None,
                app_name: str = APP_NAME, route_prefix: str = "/") -> dict[str, Any]:
    parse_settings(args)  # a bad arg fails here, with one line, not inside Serve
    return deployment.application(user_config=user_config, args=args, app_name=app_name, route_prefix=route_prefix)


class LocalServe:
    """A running local Serve instance with our application(s); see the module docstring."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        http = config.get("http_options") or {}
        self.host, self.port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
        self.url = f"http://{self.host}:{self.port}"

    def update_checkpoint(self, user_config: dict[str, Any], *, app_name: str = APP_NAME) -> None:
        """Apply a new ChatModel user_config; replicas reconfigure in place (hot swap in background).

        Returns once Serve has accepted it; use `wait_for_checkpoint` to wait for the swap itself.
        """
        parse_model_config(user_config)
        config = deployment.with_user_config(self.config, user_config, app_name=app_name)
        deploy(config)
        self.config = config

    def status(self, *, app_name: str = APP_NAME, timeout: float = 30) -> EngineStatus:
        """The model replica's status (one replica's, when there are several)."""
        handle = serve.get_deployment_handle(deployment.MODEL_DEPLOYMENT, app_name=app_name)
        status: EngineStatus = handle.status.remote().result(timeout_s=timeout)
        return status

    def wait_for_checkpoint(self, checkpoint_id: str, *, timeout: float = 300,
                            app_name: str = APP_NAME) -> EngineStatus:
        """Wait until the replica serves `checkpoint_id`; raise RuntimeError if that swap failed."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(app_name=app_name)
            weights = st.weights
            if weights.checkpoint == checkpoint_id and not weights.loading:
                return st
            err = st.counters.last_swap_error or ""
            if weights.degraded and not weights.loading and checkpoint_id in err:
                raise RuntimeError(f"swap to {checkpoint_id} failed: {err}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"still serving {weights.checkpoint} after {timeout:.0f}s")
            time.sleep(0.5)

    def shutdown(self) -> None:
        shutdown()


def deploy(config: dict[str, Any], *, timeout: float = 600) -> None:
    """Apply a declarative config (ServeDeploySchema) to the running Serve and wait for RUNNING.

    This is what `serve run config.yaml` and KubeRay do; `serve.run(app)` would give every
    deployment a random code version and restart replicas instead of reconfiguring them.
    """
    from ray.serve._private import api as serve_private
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_private.serve_start(http_options=config.get("http_options") or {},
                                       controller_options=config.get("controller_options"))
    client.deploy_apps(schema, _blocking=False)
    names = [a["name"] for a in config["applications"]]
    deadline = time.monotonic() + timeout
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n in names if states[n] in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"serve application failed: {failed}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"serve applications not running after {timeout:.0f}s: {states}")
        time.sleep(0.5)


def start_local(*, port: int = 8000, user_config: dict[str, Any] | None = None, args: dict[str, Any] | None = None,
                host: str = "127.0.0.1", app_name: str = APP_NAME, num_cpus: int | None = None,
                timeout: float = 600) -> LocalServe:
    """Start (or join) a local Ray, start Serve on host:port, deploy the app, wait until it answers."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 namespace="selflearn")
    config = serve_config(port=port, host=host, user_config=user_config, args=args, app_name=app_name)
    deploy(config, timeout=timeout)
    server = LocalServe(config)
    _wait_listening(server.url, timeout=min(timeout, 60))
    return server


def _wait_listening(url: str, *, timeout: float) -> None:
    """Wait for Serve's HTTP proxy at `url`.

    Serve started earlier in the same Ray keeps its own port and silently ignores ours, which
    would otherwise surface much later as "connection refused" on the first request.
    """
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/routes", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # something answered: the proxy is up (a 503 while routes propagate is fine)
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Serve is not listening on {url} ({err}); if Serve was already running in "
                                   "this Ray on another port, call serve.shutdown() first") from err
            time.sleep(0.5)


def shutdown() -> None:
    """Stop Serve (all applications) in this Ray; leaves Ray itself running."""
    serve.shutdown()
