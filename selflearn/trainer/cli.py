"""`selflearn train` (also `python -m selflearn.trainer`): one round end to end; the trainer Job's
entrypoint.

Prints the round's result as one JSON line on stdout and, inside a Kubernetes pod, writes the
same line to the termination message file, where the operator reads it. `--procs N` (one
machine) or `--nnodes N` (one launcher per pod of an Indexed Job) runs the round as N ranks
under PyTorch's elastic launcher (trainer/launch.py); each rank is this same command. While the round runs,
stderr shows it (`selflearn.trainer.progress`: a bar per training phase on a terminal, plain
lines elsewhere; none with `--no-progress`), and `--progress-file` keeps its progress document
(`contracts.RoundProgress`) for local mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..contracts import ProgressEvent, RoundProgress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-config", required=True, help="LearnerRun manifest, bare spec, or {name, spec} YAML")
    p.add_argument("--round", type=int, required=True, help="round number (>= 1)")
    p.add_argument("--parent", default=None,
                   help="checkpoint URI to train from, or 'base'; default: the promoted, else newest checkpoint")
    p.add_argument("--workdir", default=None, help="scratch directory (default: system temp)")
    p.add_argument("--no-progress", action="store_true",
                   help="do not show the round's phases and training progress on stderr")
    p.add_argument("--progress-file", default=None,
                   help="keep the round's live progress (phase, step of total, loss, tokens/s, ETA) in this JSON file")
    d = p.add_argument_group("distributed (docs/distributed.md)")
    d.add_argument("--procs", type=int, default=1,
                   help="ranks on this machine (torchrun's --nproc-per-node); default 1: one process")
    d.add_argument("--nnodes", type=int, default=1, help="machines (pods) taking part, each running this command")
    d.add_argument("--rdzv-endpoint", default=None,
                   help="host:port where the ranks meet (c10d rendezvous; the first worker's); needed with --nnodes > 1")
    d.add_argument("--rdzv-id", default=None, help="the rendezvous' name, the same on every worker (default: the round)")
    d.add_argument("--local-addr", default=None,
                   help="this machine's address as the other workers reach it (default: its fully qualified name)")
    d.add_argument("--rdzv-timeout", type=int, default=None,
                   help="seconds to wait for every worker to join (default: the run's trainer.rendezvousTimeoutSeconds)")


class ProgressFile:
    """The running round's progress as one small JSON document (`contracts.RoundProgress`),
    replaced atomically on each event (local mode shows it while the round runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc = RoundProgress(started_at=time.time())
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def __call__(self, event: ProgressEvent) -> None:
        self.doc = self.doc.after(event, time.time())
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.doc.to_json()))
        os.replace(tmp, self.path)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import CheckpointError
    from ..contracts import RoundResult, write_termination_log
    from ..spec import load_run_config
    from .progress import RoundDisplay, fan_out
    from .round import run_round

    config = load_run_config(args.run_config)
    if args.procs < 1 or args.nnodes < 1:
        raise ValueError("--procs and --nnodes must be at least 1")
    if (args.procs > 1 or args.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        from .launch import launch

        return launch(args, config)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if rank != 0:  # rank 0 shows the round; the others' progress is the same
        args.no_progress, args.progress_file = True, None
    display = None if args.no_progress else RoundDisplay(sys.stderr)
    progress_file = ProgressFile(Path(args.progress_file)) if args.progress_file else None
    try:
        result = run_round(config, args.round, parent=args.parent,
                           workdir=Path(args.workdir) if args.workdir else None,
                           on_step=fan_out([progress_file, display]))
    except (ValueError, CheckpointError) as err:
        write_termination_log(RoundResult("failed", args.round, reason=str(err)).to_line())
        raise ValueError(str(err)) from None
    finally:
        if display:
            display.close()
    line = result.to_line()
    if local_rank == 0:  # one line per machine (pod): every pod of the round tells its result
        write_termination_log(line)
    if rank == 0:
        print(line, flush=True)
    return 0 if result.status in ("published", "empty") else 1
