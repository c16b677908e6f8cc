"""The Serve application's declarative config, built once for local mode and the operator.

Ray Serve (`serve deploy`, KubeRay's serveConfigV2) runs one application: `ChatModel` (the engine
and its hot swap) behind `ChatIngress` (the HTTP API). The checkpoint lives only in ChatModel's
`user_config`: Serve applies a change of a deployment's user_config alone in place, through
`reconfigure()`, so a promotion is a hot swap; a change of the application's `args` would
redeploy every replica instead. Pure: no Ray import, so the operator's image needs no Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..spec import MemoryUseSpec

if TYPE_CHECKING:
    from ..spec import LearnerRunSpec

APP_NAME = "selflearn"
IMPORT_PATH = "selflearn.serving.app:app_builder"
MODEL_DEPLOYMENT = "ChatModel"
INGRESS_DEPLOYMENT = "ChatIngress"

# Serve's HTTP proxy runs uvicorn, which by default believes X-Forwarded-For from 127.0.0.1 and
# rewrites the client address with it before any app sees the request (uvicorn's
# `forwarded_allow_ips`, read from FORWARDED_ALLOW_IPS in the proxy's process): whoever reaches the
# proxy from its own machine could name a new client per request, past the rate limit and the
# per-client feedback cap. So the proxy trusts no one and the ingress decides from the raw peer
# and its own `trusted_proxies` (serving/http/guard.py: ProxyTrust). The proxy actors inherit the
# Serve controller's environment, which a serve config sets in `controller_options` (Ray applies it
# when the controller is created: a RayService's first deploy, or `start_local` on a fresh Serve).
PROXY_ENV = {"FORWARDED_ALLOW_IPS": ""}


def controller_options() -> dict[str, Any]:
    """The serve config's `controller_options`: the proxies' environment (`PROXY_ENV`)."""
    return {"runtime_env": {"env_vars": dict(PROXY_ENV)}}


def model_user_config(*, base_model: str, checkpoint: str | None, storage_endpoint: str | None = None,
                      storage_region: str | None = None, memory: MemoryUseSpec | None = None,
                      engine: str = "auto", quantization: str = "none") -> dict[str, Any]:
    """ChatModel's user_config (validated by `config.ModelConfig`); `checkpoint` None: the base model."""
    uc: dict[str, Any] = {"checkpoint": checkpoint, "base_model": base_model}
    if engine != "auto":
        uc["engine"] = engine
    if quantization != "none":
        uc["quantization"] = quantization
    if storage_endpoint:
        uc["storage_endpoint"] = storage_endpoint
    if storage_region:
        uc["storage_region"] = storage_region
    if memory is not None and memory != MemoryUseSpec():
        uc["memory"] = memory.model_dump(mode="json")
    return uc


def run_user_config(spec: LearnerRunSpec, checkpoint: str | None) -> dict[str, Any]:
    """ChatModel's user_config for a LearnerRun (or a local run) serving `checkpoint`."""
    return model_user_config(base_model=spec.base_model, checkpoint=checkpoint,
                             storage_endpoint=spec.storage.endpoint, storage_region=spec.storage.region,
                             memory=spec.serving.memory, engine=spec.serving.engine,
                             quantization=spec.serving.quantization)


def application(*, user_config: dict[str, Any] | None, args: dict[str, Any] | None, app_name: str = APP_NAME,
                route_prefix: str = "/", model_replicas: int | None = None, model_gpus: int = 0,
                ingress_replicas: int | None = None) -> dict[str, Any]:
    """One application of a serveConfigV2 / ServeDeploySchema. Replica counts left None are
    Serve's defaults (or `args`' model_replicas/ingress_replicas, read by `app_builder`)."""
    model: dict[str, Any] = {"name": MODEL_DEPLOYMENT}
    if model_replicas is not None:
        model["num_replicas"] = model_replicas
    model["user_config"] = dict(user_config or {})
    if model_gpus:
        model["ray_actor_options"] = {"num_gpus": model_gpus}
    deployments = [model]
    if ingress_replicas is not None:
        deployments.append({"name": INGRESS_DEPLOYMENT, "num_replicas": ingress_replicas})
    return {"name": app_name, "route_prefix": route_prefix, "import_path": IMPORT_PATH, "args": dict(args or {}),
            "deployments": deployments}


def with_user_config(config: dict[str, Any], user_config: dict[str, Any], *, app_name: str = APP_NAME) -> dict[str, Any]:
    """A copy of a serve config whose ChatModel user_config is `user_config` (a promotion)."""
    apps = []
    for app in config.get("applications") or []:
        if app.get("name") == app_name:
            app = {**app, "deployments": [{**d, "user_config": dict(user_config)} if d.get("name") == MODEL_DEPLOYMENT
                                          else d for d in app.get("deployments") or []]}
        apps.append(app)
    return {**config, "applications": apps}


def served_checkpoint(config: dict[str, Any] | None) -> tuple[bool, str | None]:
    """(found, checkpoint) of ChatModel's user_config in a parsed serve config."""
    try:
        for app in (config or {}).get("applications") or []:
            for dep in app.get("deployments") or []:
                if dep.get("name") == MODEL_DEPLOYMENT and "checkpoint" in (dep.get("user_config") or {}):
                    return True, dep["user_config"]["checkpoint"]
    except (AttributeError, TypeError):
        pass
    return False, None
