"""`selflearn train --procs N` / `--nnodes N`: the round as N ranks, started by PyTorch's elastic
launcher (what `torchrun` runs), each rank the same `selflearn train` command without these flags.

The launcher is ours rather than the `torchrun` script so that a failed round still ends the way
a one-process round does: one result line on stdout and in the pod's termination message,
naming the rank that failed and why, which the operator and `selflearn local` read.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from ..contracts import RoundResult, write_termination_log
from ..machine import available_cpus
from ..spec import RunConfig

log = logging.getLogger("selflearn.trainer")

# The port the first worker's launcher serves the rendezvous on (torchrun's default).
RDZV_PORT = 29400


def worker_argv(args: argparse.Namespace) -> list[str]:
    """What each rank runs: this round's arguments, without the launcher's own."""
    argv = ["--run-config", args.run_config, "--round", str(args.round)]
    for flag, value in (("--parent", args.parent), ("--workdir", args.workdir),
                        ("--progress-file", args.progress_file)):
        if value:
            argv += [flag, str(value)]
    return argv + (["--no-progress"] if args.no_progress else [])


def _reason(stderr: Path) -> str:
    """The last thing a failed rank said: its one-line error, else its traceback's last line."""
    try:
        lines = [ln.strip() for ln in stderr.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    for ln in reversed(lines):
        if ln.startswith("selflearn train: error:"):
            return ln.removeprefix("selflearn train: error:").strip()
    # Not the launcher's own log lines (glog style, "W1203 22:46:18.39 ..."), which tee mixes in.
    tb = [ln for ln in lines if not re.match(r"\[?[WIEF]\d{4} |\[rank", ln)]
    return tb[-1] if tb else "no output"


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def wait_resolvable(endpoint: str, timeout: float) -> str | None:
    """Wait until the rendezvous host has an address (a pod's name in a headless Service appears in
    DNS a few seconds after the pod); None when it does, else why not."""
    import socket
    import time

    host = endpoint.rsplit(":", 1)[0].strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.getaddrinfo(host, None)
            return None
        except OSError as err:
            if time.monotonic() > deadline:
                return f"{host} does not resolve: {err}"
        time.sleep(1.0)


def launch(args: argparse.Namespace, config: RunConfig) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ValueError("--nnodes > 1 needs --rdzv-endpoint host:port (the first worker's)")
    timeout = args.rdzv_timeout or config.spec.trainer.rendezvous_timeout_seconds
    world = args.nnodes * args.procs
    if args.rdzv_endpoint and (why := wait_resolvable(args.rdzv_endpoint, timeout)):
        return _failed(args.round, f"the {world} ranks cannot meet at {args.rdzv_endpoint}: {why}")
    logs = Path(tempfile.mkdtemp(prefix="selflearn-ranks-"))
    cfg = LaunchConfig(
        min_nodes=args.nnodes, max_nodes=args.nnodes, nproc_per_node=args.procs,
        run_id=args.rdzv_id or f"{config.name}-r{args.round}",
        rdzv_backend="c10d",
        # One machine: the launcher serves the rendezvous itself, on a free port.
        rdzv_endpoint=args.rdzv_endpoint or "localhost:0",
        rdzv_configs={"join_timeout": timeout},
        max_restarts=0,  # a failed round is retried as a whole, by whoever schedules rounds
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(logs), tee=Std.ERR),
        local_addr=args.local_addr,
    )
    # Each rank gets its share of the cores this pod may use (torch would take every core of the
    # node in every rank, a CPU limit notwithstanding).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cpus() // args.procs)))
    log.info("round %d on %d ranks (%d machine(s) x %d), rendezvous %s", args.round, world, args.nnodes,
             args.procs, cfg.rdzv_endpoint)
    try:
        elastic_launch(cfg, sys.executable)("-m", "selflearn.trainer", *worker_argv(args))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        stderr = next(logs.glob(f"*/attempt_*/{failure.local_rank}/stderr.log"), None)
        why = _reason(stderr) if stderr else "no output"
        reason = f"rank {rank} of {world} failed ({_exit(failure.exitcode)}): {why}"
        return _failed(args.round, reason)
    except RendezvousError as err:
        return _failed(args.round, f"the {world} ranks did not meet within {timeout} s at "
                                   f"{cfg.rdzv_endpoint}: {type(err).__name__}: {err}")
    except Exception as err:  # the launcher itself (an address that does not resolve, a port taken)
        log.exception("the launcher failed")
        return _failed(args.round, f"the launcher of {args.procs} rank(s) on this machine failed: "
                                   f"{type(err).__name__}: {err}")
    finally:
        shutil.rmtree(logs, ignore_errors=True)  # each rank's stderr was shown as it ran (tee)
    return 0


def _failed(round_: int, reason: str) -> int:
    line = RoundResult("failed", round_, reason=reason).to_line()
    write_termination_log(line)
    print(line, flush=True)
    log.error("round %d failed: %s", round_, reason)
    return 1
