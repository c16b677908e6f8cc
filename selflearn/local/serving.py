"""Local mode's Ray Serve glue: start the chat app (with the dashboard beside it) on a local Ray,
point it at another checkpoint, shut it and that Ray down.

Ray is imported only inside these functions: `selflearn local --no-serve` and the trainer never
load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..contracts import base_id, checkpoint_id_of_uri
from ..feedback import feedback_uri
from ..serving.deployment import run_user_config

if TYPE_CHECKING:
    from ..serving.app import LocalServe
    from ..spec import RunConfig


def web_dir() -> Path:
    """The browser dashboard's directory (index.html), served at /dashboard."""
    return Path(__file__).resolve().parent / "web"


def serve_user_config(config: RunConfig, checkpoint: str | None) -> dict[str, Any]:
    """The chat deployment's user_config serving `checkpoint` (None: the base model) for run
    `config`, built as the operator builds it for a RayService."""
    return run_user_config(config.spec, checkpoint)


def swap_serving(server: LocalServe, config: RunConfig, checkpoint: str | None, *, timeout: float) -> None:
    """Reconfigure the running app onto `checkpoint` and wait until the replica answers with it."""
    server.update_checkpoint(serve_user_config(config, checkpoint))
    server.wait_for_checkpoint(checkpoint_id_of_uri(checkpoint) if checkpoint else base_id(config.spec.base_model),
                               timeout=timeout)


class ServedDriver(Protocol):
    """What `start_serving` needs of the driver (a `LocalDriver`)."""

    config: RunConfig
    state_path: Path
    server: LocalServe | None

    def on_served(self, checkpoint: str | None) -> None:
        """Serving answers with `checkpoint` (None: the base model) from now on."""


def check_startup(user_config: dict[str, Any], args: dict[str, Any], *, allow_degraded: bool) -> None:
    """Refuse (ValueError, one line) before Ray starts: a checkpoint that fails the loader's own
    verification (unless `allow_degraded`: then the replica serves the base model, marked degraded),
    or an API key variable that is set but empty."""
    import os

    from ..serving.config import api_key_of, parse_model_config, parse_settings
    from ..serving.loader import verify_checkpoint

    settings = parse_settings(args)
    api_key_of(settings, os.environ)
    reason = verify_checkpoint(parse_model_config(user_config), settings.engine)
    if reason and not allow_degraded:
        raise ValueError(f"{reason} (--allow-degraded serves the base model instead, marked degraded)")


def start_serving(driver: ServedDriver, *, port: int, host: str = "127.0.0.1", serving: str | None = None,
                  app_args: dict[str, Any] | None = None, allow_degraded: bool = False) -> LocalServe:
    """Start Ray Serve with the chat app on `serving` (None: the base model), the dashboard beside it.

    ValueError (one line) when `serving` fails verification, unless `allow_degraded`, or when the
    replica has nothing to serve."""
    from ..serving.app import start_local

    args = {"state_file": str(driver.state_path), "dashboard_dir": str(web_dir()), **(app_args or {})}
    fb = driver.config.spec.feedback
    if fb is not None:
        # /feedback writes where the run's feedback source reads.
        args.setdefault("feedback_uri", fb.uri or feedback_uri(driver.config.spec.storage.uri, driver.config.name))
    if allow_degraded:
        args["engine"] = {**(args.get("engine") or {}), "allow_base_fallback": True}
    user_config = serve_user_config(driver.config, serving)
    check_startup(user_config, args, allow_degraded=allow_degraded)
    server = start_local(port=port, host=host, user_config=user_config, args=args)
    driver.server = server
    st = server.status()
    if not st.weights.ready:
        raise ValueError(f"nothing to serve: {st.unready_reason}")
    # Degraded: the base model serves in the checkpoint's stead, so the next promotion must swap.
    driver.on_served(None if st.weights.degraded else serving)
    return server


def served_line(server: LocalServe) -> str:
    """What serves, degraded and why, and whether auth is on, for the start-up line."""
    import os

    from ..serving.cli import serving_note
    from ..serving.config import api_key_of, parse_settings
    from ..serving.deployment import APP_NAME

    args = next(a for a in server.config["applications"] if a["name"] == APP_NAME)["args"]
    return serving_note(server.status(), auth=api_key_of(parse_settings(args), os.environ) is not None)


def stop_serving(server: LocalServe | None) -> None:
    """Shut down Serve and the local Ray this process started (no orphan raylets)."""
    import ray

    try:
        if server is not None:
            server.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
