"""`selflearn serve`: the chat API and page on a local Ray Serve (the same app a RayService runs)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

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
                        help="require the API key held in this environment variable (default SELFLEARN_API_KEY "
                             "if set)")
    parser.add_argument("--rate-limit", type=float, metavar="PER_MIN", help="requests per minute per client")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allowed CORS origin (repeatable)")
    parser.add_argument("--feedback-uri", metavar="URI", help="file:// or s3:// prefix for feedback")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], help="weights dtype (default auto)")
    parser.add_argument("--replicas", type=int, metavar="N", help="ChatModel replicas (default 1)")


def build(args: argparse.Namespace) -> tuple[dict, dict]:
    """(user_config, app args) from the command line; ValueError with one line when they are bad."""
    import yaml

    from .config import parse_model_config, parse_settings

    app_args: dict = {}
    if args.config:
        try:
            with open(args.config) as f:
                app_args = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {args.config} does not exist") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config file {args.config} is not valid YAML: {err}") from None
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
    if engine:
        app_args["engine"] = engine
    for flag, key in (("api_key_env", "api_key_env"), ("rate_limit", "rate_limit_per_minute"),
                      ("cors_origin", "cors_origins"), ("feedback_uri", "feedback_uri"),
                      ("replicas", "model_replicas")):
        if getattr(args, flag) is not None:
            app_args[key] = getattr(args, flag)
    cfg = parse_model_config(user_config)
    parse_settings(app_args)
    if cfg.checkpoint:  # fail now, not as a fallback to the base model inside the replica
        from ..checkpoints import CheckpointError, CheckpointStore

        store, run, round_ = CheckpointStore.for_checkpoint(cfg.checkpoint, endpoint=cfg.storage_endpoint,
                                                            region=cfg.storage_region)
        try:
            store.manifest(store.ref(run, round_))
        except CheckpointError as err:
            raise ValueError(str(err)) from None
        except Exception as err:
            raise ValueError(f"cannot read checkpoint {cfg.checkpoint}: {type(err).__name__}: {err}") from None
    return user_config, app_args


def run(args: argparse.Namespace) -> int:
    user_config, app_args = build(args)
    import ray

    from .app import shutdown, start_local

    # Handlers first: Ctrl-C while Ray and the model start up must still end in a clean shutdown.
    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        server = start_local(port=args.port, host=args.host, user_config=user_config, args=app_args)
        signal.signal(signal.SIGTERM, on_signal)  # ray.init installs its own SIGTERM handler
        st = server.status()
        degraded = f" [degraded: {st.get('last_swap_error')}]" if st.get("degraded") else ""
        print(f"selflearn serve: {server.url}/ (chat page), {server.url}/v1 (OpenAI API); "
              f"serving {st['checkpoint']}{degraded}", flush=True)
        stop.wait()
    finally:
        shutdown()
        ray.shutdown()
    return 0
