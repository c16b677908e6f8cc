"""`selflearn` command line: each subcommand's arguments and work live beside the code they drive.

Subcommand modules expose `add_arguments(parser)` and `run(args) -> int` and import heavy
libraries (torch, ray) only inside `run`, so `selflearn --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("selflearn.trainer.cli", "run one training round and publish its checkpoint"),
    "serve": ("selflearn.serving.cli", "serve the chat API and page on a local Ray"),
    "local": ("selflearn.local.cli", "the whole learning loop on one machine"),
    "status": ("selflearn.local.status", "print a local run's rounds as a table"),
    "operator": ("selflearn.operator.cli", "run the Kubernetes operator for LearnerRun"),
}

# Modules of the `serve` extra (pyproject.toml), missing where only the trainer is installed.
SERVE_EXTRA = frozenset({"ray", "fastapi", "uvicorn", "starlette", "prometheus_client"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selflearn", description="A chatbot that keeps learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue  # a component not installed in this image (e.g. a trainer-only build)
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args._module.run(args) or 0)
    except ValueError as err:
        # Bad config or input: one clear line, no traceback.
        print(f"selflearn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in SERVE_EXTRA:
            raise
        # The trainer/operator image and a plain `pip install selflearn` leave serving out.
        print(f"selflearn {args.command}: error: this needs the serving extra ({err.name} is not installed): "
              "pip install 'selflearn[serve]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
