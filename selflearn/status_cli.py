"""`selflearn status`: a local run's rounds as a table (what the dashboard shows)."""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=".selflearn", help="the data dir of `selflearn local` (default ./.selflearn)")
    p.add_argument("--json", action="store_true", help="print the raw state document")
    p.add_argument("--articles", action="store_true", help="also list each round's articles with their source")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")


def run(args: argparse.Namespace) -> int:
    from .dashboard import format_table, read_state

    while True:
        state = read_state(args.data_dir)
        if state is None:
            raise ValueError(f"no local run in {args.data_dir} (start one with `selflearn local`)")
        if args.json:
            print(json.dumps(state, indent=1, sort_keys=True))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(format_table(state, articles=args.articles), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)
