"""`selflearn operator`: the Kopf operator for LearnerRun, against any kubeconfig or in-cluster.

Several replicas are safe with Kopf peering: each replica gets a distinct priority (random unless
`--priority` is given), the highest one works and the others wait; when it disappears the next one
takes over after the peering lifetime. Peering needs Kopf's peering CRDs and a peering object
(ClusterKopfPeering for cluster-wide, KopfPeering per namespace) named as `--peering` says.
"""

from __future__ import annotations

import argparse
import logging
import os
import random

DEFAULT_PEERING = "selflearn"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                   help="watch this namespace (repeatable; globs like 'team-*' work); default: all namespaces")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig file (default: in-cluster service account, else $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    peering = p.add_mutually_exclusive_group()
    peering.add_argument("--peering", metavar="NAME", default=None,
                         help="require Kopf peering through this peering object (for several replicas)")
    peering.add_argument("--standalone", action="store_true", help="no peering: exactly one replica runs")
    p.add_argument("--priority", type=int, default=None,
                   help="peering priority (default: random, so that replicas never tie)")
    p.add_argument("--liveness", metavar="URL", default=os.environ.get("SELFLEARN_OPERATOR_LIVENESS"),
                   help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--tick", type=float, default=10.0, help="seconds between reconciliations of each run")
    p.add_argument("--retry-base", type=float, default=30.0,
                   help="seconds before retrying a failed round; doubles per failure")
    p.add_argument("--retry-max", type=float, default=3600.0, help="longest retry backoff, seconds")
    p.add_argument("--history", type=int, default=20, help="rounds kept in status.history")


class _QuietTimer(logging.Filter):
    """Kopf logs every successful timer run at INFO: once per tick per run is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.getMessage().startswith("Timer 'reconcile' succeeded"))


def run(args: argparse.Namespace) -> int:
    import kopf

    from .handlers import OperatorConfig, build_registry, make_settings
    from .kube import Connection

    if args.tick <= 0 or args.retry_base <= 0 or args.retry_max < args.retry_base or args.history < 1:
        raise ValueError("--tick and --retry-base must be > 0, --retry-max >= --retry-base, --history >= 1")
    config = OperatorConfig(tick_seconds=args.tick, retry_base_seconds=args.retry_base,
                            retry_max_seconds=args.retry_max, history_limit=args.history)
    try:
        connection = Connection.load(kubeconfig=args.kubeconfig, context=args.context)
    except Exception as err:  # noqa: BLE001 - the kubernetes package raises several kinds
        raise ValueError(f"cannot load Kubernetes credentials: {err}") from None
    logging.getLogger("kopf.objects").addFilter(_QuietTimer())
    settings = make_settings()
    if not args.peering and not args.standalone:
        settings.peering.name = DEFAULT_PEERING  # used when Kopf's peering CRDs are installed
    namespaces = args.namespace
    kopf.run(
        registry=build_registry(config),
        settings=settings,
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=args.priority if args.priority is not None else random.randint(1, 1_000_000),
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(connection=connection, config=config),
    )
    return 0
