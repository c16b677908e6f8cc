"""`selflearn serve`: the chat API and page on a local Ray Serve (the same app a RayService runs)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

from ..contracts import EngineStatus

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="URI",
                     help="checkpoint to serve: file:///abs/store/<run>/r000003 or s3://bucket/prefix/<run>/r000003")
    src.add_argument("--model", metavar="ID", default=None,
                     help="base model to serve when no checkpoint is given (default: embedded:smollm2-135m-instruct)")
    parser.add_argument("--base-model", metavar="ID", default=None,
                        help="base model of --checkpoint, for LoRA adapters without one in their manifest")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--storage-endpoint", metavar="URL", help="S3 endpoint (credentials from AWS_* env vars)")
    parser.add_argument("--storage-region", metavar="REGION")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML with app args (rate limits, CORS, caps, feedback_uri...; see docs/serving.md)")
    parser.add_argument("--api-key-env", metavar="VAR", default=None,
                        help="require the API key held in this environment variable, which must be set "
                             "(default: SELFLEARN_API_KEY if set; else auth is off)")
    parser.add_argument("--allow-degraded", action="store_true",
                        help="if the checkpoint fails verification or loading, serve the base model and say so "
                             "(default: refuse to start)")
    parser.add_argument("--rate-limit", type=float, metavar="PER_MIN", help="requests per minute per client")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allowed CORS origin (repeatable)")
    parser.add_argument("--feedback-uri", metavar="URI", help="file:// or s3:// prefix for feedback")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], help="weights dtype (default auto)")
    parser.add_argument("--replicas", type=int, metavar="N", help="ChatModel replicas (default 1)")


def build(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(user_config, app args) from the command line; ValueError with one line when they are bad."""
    from ..yaml_input import load_yaml_file
    from .config import api_key_of, parse_model_config, parse_settings
    from .loader import verify_checkpoint

    app_args: dict[str, Any] = {}
    if args.config:
        app_args = load_yaml_file(args.config, what="config file") or {}
        if not isinstance(app_args, dict):
            raise ValueError(f"config file {args.config} must be a mapping")
    user_config = dict(app_args.pop("user_config", None) or {})
    if args.checkpoint:
        user_config["checkpoint"] = args.checkpoint
    if args.model or args.base_model:
        user_config["base_model"] = args.model or args.base_model
    if args.storage_endpoint:
        user_config["storage_endpoint"] = args.storage_endpoint
    if args.storage_region:
        user_config["storage_region"] = args.storage_region
    engine = dict(app_args.get("engine") or {})
    if args.dtype:
        engine["dtype"] = args.dtype
    if args.allow_degraded:
        engine["allow_base_fallback"] = True
    if engine:
        app_args["engine"] = engine
    for flag, key in (("api_key_env", "api_key_env"), ("rate_limit", "rate_limit_per_minute"),
                      ("cors_origin", "cors_origins"), ("feedback_uri", "feedback_uri"),
                      ("replicas", "model_replicas")):
        if getattr(args, flag) is not None:
            app_args[key] = getattr(args, flag)
    cfg = parse_model_config(user_config)
    settings = parse_settings(app_args)
    api_key_of(settings, os.environ, option="--api-key-env" if args.api_key_env else "api_key_env")
    # Fail now, before Ray, rather than serve something else: the loader's own download and checks,
    # into the cache the replica loads from.
    reason = verify_checkpoint(cfg, settings.engine)
    if reason and not settings.engine.allow_base_fallback:
        raise ValueError(f"{reason} (--allow-degraded serves the base model instead, marked degraded)")
    return user_config, app_args


def serving_note(status: EngineStatus, *, auth: bool) -> str:
    """The served id, degraded and why, and whether auth is on: the tail of a start-up line."""
    weights = status.weights
    served = f"{weights.checkpoint} DEGRADED: {weights.degraded_reason}" if weights.degraded else weights.checkpoint
    return f"{served}; {'API key required' if auth else 'auth off: no API key, open to whoever reaches it'}"


def startup_line(url: str, status: EngineStatus, *, auth: bool) -> str:
    """What `selflearn serve` prints once it answers."""
    return f"selflearn serve: {url}/ (chat page), {url}/v1 (OpenAI API); serving {serving_note(status, auth=auth)}"


def run(args: argparse.Namespace) -> int:
    user_config, app_args = build(args)
    import ray

    from .app import shutdown, start_local
    from .config import api_key_of, parse_settings

    # Handlers first: Ctrl-C while Ray and the model start up must still end in a clean shutdown.
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        server = start_local(port=args.port, host=args.host, user_config=user_config, args=app_args)
        signal.signal(signal.SIGTERM, on_signal)  # ray.init installs its own SIGTERM handler
        st = server.status()
        # The checkpoint passed verification, but loading it (or the base model) did not.
        if (why := st.unready_reason) is not None:
            raise ValueError(f"nothing to serve: {why}")
        auth = api_key_of(parse_settings(app_args), os.environ) is not None
        print(startup_line(server.url, st, auth=auth), flush=True)
        stop.wait()
    finally:
        shutdown()
        ray.shutdown()
    return 0
