"""Checkpoint ids: a round's directory `r000007`, its id `<run>/r000007`, `base:<model>`."""

from __future__ import annotations

import re

BASE_PREFIX = "base:"
_ROUND_DIR = re.compile(r"^r(\d{6,})$")
# file:///path/<run>/r000007 or s3://bucket/prefix/<run>/r000007
CHECKPOINT_URI_RE = re.compile(r"^(file|s3)://.+/[^/]+/r\d{6,}/?$")


def round_dir(round_: int) -> str:
    """A round's directory under its run: `r000007`."""
    return f"r{round_:06d}"


def parse_round_dir(name: str) -> int | None:
    """`r000007` -> 7; anything else -> None."""
    m = _ROUND_DIR.match(name)
    return int(m.group(1)) if m else None


def checkpoint_id(run: str, round_: int) -> str:
    """The short id users see: `<run>/r000007`."""
    return f"{run}/{round_dir(round_)}"


def checkpoint_id_of_uri(uri: str) -> str:
    """`s3://b/p/run/r000007` -> `run/r000007` (a URI not in that form is its own id)."""
    parts = uri.rstrip("/").rsplit("/", 2)
    return "/".join(parts[-2:]) if len(parts) == 3 and parse_round_dir(parts[-1]) is not None else uri


def base_id(model: str) -> str:
    """The id of an untrained base model: `base:<model>`."""
    return f"{BASE_PREFIX}{model}"
