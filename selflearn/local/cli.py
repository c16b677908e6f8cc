"""`selflearn local`: serve the chat page at once, then learn round after round on this machine.

Defaults need no network: the bundled model, the offline Wikipedia snapshot, a file:// store
under --data-dir, and small CPU-sized rounds spaced --interval seconds apart (the trainer runs
niced in a subprocess, so the chat stays responsive on 2 cores).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..spec import RunConfig

# CPU-sized rounds: a minute or two each on 2 cores with the bundled 135M model.
# Chat-format rounds (the default `mixed`): 3 question/answer pairs per article (what is it, the
# rest of its facts, a summary; a quarter of them asked after passages, as serving asks with its
# memory: 2.63x the base model's knowledge on phrasings never trained, where 2 pairs gave 1.97x,
# docs/memory.md), 8 articles of earlier rounds asked about again, 15 replayed
# chat answers against forgetting (3 of each kind, lists included: a list that stops where it
# should is the first manner a round loses), at a learning rate that makes the answers stick in
# 2 epochs and keeps the general set's perplexity inside the gate (measured with
# bench/knowledge.py; see docs/local.md).
LOCAL_TRAINING = {"epochs": 2, "batchSize": 4, "gradientAccumulation": 1, "learningRate": 1.0e-4,
                  "maxLength": 256, "evalArticles": 4, "generalArticles": 8, "qaPairsPerArticle": 3,
                  "chatReplay": 15, "qaReview": 8, "qaReading": 0.25}
LOCAL_ARTICLES = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    n = p.add_mutually_exclusive_group()
    n.add_argument("--rounds", type=int, metavar="N", help="stop after N rounds (default: forever)")
    n.add_argument("--forever", action="store_true", help="learn until Ctrl-C (the default)")
    p.add_argument("--model", metavar="ID", help="embedded:smollm2-135m-instruct (default), a hub id or a local dir")
    p.add_argument("--source", action="append", metavar="SRC",
                   help="snapshot[:lang] (default snapshot:en), wikipedia[:lang] or files:PATH[,PATH...]; repeatable")
    p.add_argument("--articles", type=int, metavar="N", help=f"articles per round per source (default {LOCAL_ARTICLES})")
    p.add_argument("--store", metavar="URI", help="file://DIR or s3://bucket/prefix (default file://DATA_DIR/checkpoints)")
    p.add_argument("--storage-endpoint", metavar="URL", help="S3 endpoint (credentials from AWS_* env vars)")
    p.add_argument("--data-dir", default=".selflearn", help="state, logs and the default store (default ./.selflearn)")
    p.add_argument("--name", default=None, help="run name (default: local)")
    p.add_argument("--config", metavar="FILE", help="a LearnerRun manifest or spec YAML; flags override it")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="pause between rounds (default: the spec's schedule.intervalSeconds, 30 locally)")
    p.add_argument("--learning-rate", type=float, metavar="LR", help="override training.learningRate")
    p.add_argument("--max-perplexity-increase", type=float, metavar="FRACTION",
                   help="promotion gate on the general set (default 0.02)")
    p.add_argument("--pin", metavar="URI", help="serve this checkpoint and promote nothing (rollback)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the chat page and API (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--no-serve", action="store_true", help="learn only; start no Ray Serve (headless)")
    p.add_argument("--allow-degraded", action="store_true",
                   help="if the promoted checkpoint fails verification or loading, serve the base model and say so "
                        "(default: refuse to start)")
    p.add_argument("--no-feedback", action="store_true",
                   help="do not learn from the chat's 👍/👎 and corrections (learned by default)")
    p.add_argument("--nice", type=int, default=10, help="niceness of the trainer subprocess (default 10)")
    p.add_argument("--train-procs", type=int, default=1, metavar="N",
                   help="train each round as N ranks (DDP/FSDP under torchrun; one per GPU on a multi-GPU host)")


def parse_source(text: str, articles: int) -> dict[str, Any]:
    kind, _, arg = text.partition(":")
    if kind in ("snapshot", "wikipedia"):
        body: dict[str, Any] = {"articlesPerRound": articles}
        if arg:
            body["language"] = arg
        return {kind: body}
    if kind == "files":
        if not arg:
            raise ValueError("--source files:PATH needs a path")
        paths = [x for x in arg.split(",") if x]
        return {"files": {"paths": [str(Path(x).expanduser().resolve()) if "://" not in x else x for x in paths]}}
    raise ValueError(f"--source {text!r}: expected snapshot[:lang], wikipedia[:lang] or files:PATH")


def build_config(args: argparse.Namespace) -> RunConfig:
    """The local run's RunConfig from --config (if any) and the flags; ValueError when bad."""
    from ..spec import RunConfig, load_run_config

    if args.config:
        base = load_run_config(args.config)
        doc = base.model_dump(by_alias=True, mode="json", exclude_none=True)
        spec = doc["spec"]
        if args.name:
            doc["name"] = args.name
    else:
        doc = {"name": args.name or "local", "spec": {}}
        spec = doc["spec"]
        spec["training"] = dict(LOCAL_TRAINING)
        spec["schedule"] = {"intervalSeconds": 30}
        spec["sources"] = [{"snapshot": {"language": "en", "articlesPerRound": LOCAL_ARTICLES}}]
    data_dir = Path(args.data_dir).expanduser().resolve()
    if args.model:
        spec["baseModel"] = args.model
    if args.source:
        spec["sources"] = [parse_source(s, args.articles or LOCAL_ARTICLES) for s in args.source]
    if not args.config and not getattr(args, "no_feedback", False):
        # What the chat's users say, learned in the next round. One machine has one user, its owner,
        # so the cap that stops one client steering a shared model is set high.
        spec["sources"].append({"feedback": {"perClientCap": 50}})
    if getattr(args, "no_feedback", False):
        spec["sources"] = [s for s in spec["sources"] if "feedback" not in s]
    if args.articles:
        for s in spec["sources"]:
            for kind in ("snapshot", "wikipedia"):
                if kind in s:
                    s[kind]["articlesPerRound"] = args.articles
    storage = spec.setdefault("storage", {})
    if args.store:
        storage["uri"] = args.store if "://" in args.store else f"file://{Path(args.store).expanduser().resolve()}"
    elif not args.config or storage.get("uri", "").startswith("file://./"):
        storage["uri"] = f"file://{data_dir / 'checkpoints'}"
    if args.storage_endpoint:
        storage["endpoint"] = args.storage_endpoint
    if args.learning_rate is not None:
        spec.setdefault("training", {})["learningRate"] = args.learning_rate
    promotion = spec.setdefault("promotion", {})
    if args.max_perplexity_increase is not None:
        promotion["maxPerplexityIncrease"] = args.max_perplexity_increase
    if args.pin:
        promotion["pinnedCheckpoint"] = args.pin
    from pydantic import ValidationError

    from ..spec import format_validation_error

    try:
        return RunConfig.model_validate(doc)
    except ValidationError as err:
        raise ValueError(f"invalid local run: {format_validation_error(err)}") from None


def run(args: argparse.Namespace) -> int:
    from .driver import LocalDriver
    from .serving import served_line, start_serving, stop_serving
    from .terminal import Terminal
    from .trainer_process import TrainerOptions

    config = build_config(args)
    data_dir = Path(args.data_dir).expanduser().resolve()
    interval = args.interval if args.interval is not None else config.spec.schedule.interval_seconds
    rounds = None if args.forever else args.rounds if args.rounds is not None else config.spec.schedule.max_rounds
    # The terminal shows each round as it runs: a progress bar on a TTY, plain lines otherwise.
    driver = LocalDriver(config, data_dir, trainer=TrainerOptions(nice=args.nice, procs=args.train_procs), on_event=Terminal(sys.stdout))

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if driver.stop_event.is_set():
            raise KeyboardInterrupt  # second Ctrl-C: stop waiting politely
        print(f"\nselflearn local: stopping ({signal.Signals(signum).name}); Ctrl-C again to force", file=sys.stderr,
              flush=True)
        driver.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    state = driver.prepare()
    server = None
    try:
        if not args.no_serve:
            server = start_serving(driver, port=args.port, host=args.host, serving=state.promoted,
                                   allow_degraded=args.allow_degraded)
            print(f"selflearn local: chat on {server.url}/   dashboard {server.url}/dashboard/   "
                  f"serving {served_line(server)}", flush=True)
        print(f"selflearn local: run {config.name!r}, next round {driver.next_round()}, store "
              f"{config.spec.storage.uri}, state {driver.state_path}", flush=True)
        driver.loop(rounds=rounds, interval=interval)
    finally:
        driver.finish()
        if not args.no_serve:
            stop_serving(server)
    print(f"selflearn local: stopped after round {driver.state.round}; serving was {driver.state.serving_id}",
          flush=True)
    return 0
