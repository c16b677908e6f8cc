"""Pydantic validation errors as the one-line messages users read.

Three places report them (the LearnerRun spec, stored feedback records, HTTP request bodies),
each with its own idea of where a field lives; this module holds what they share: the dotted
field path and the message without pydantic's "Value error, " prefix.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Iterable, Mapping

ErrorDetails = Mapping[str, Any]  # one entry of ValidationError.errors()
VALUE_ERROR_PREFIX = "Value error, "  # what pydantic puts before a validator's ValueError text


def field_path(error: ErrorDetails, *, skip: Collection[Any] = (), default: str = "") -> str:
    """The error's location as a dotted path (`training.learningRate`), leaving out the parts in
    `skip`; `default` when nothing is left."""
    return ".".join(str(p) for p in error["loc"] if p not in skip) or default


def problem(error: ErrorDetails, path: str, *, plain: bool = True) -> str:
    """`path: message`, or the message alone without a path. `plain` drops the "Value error, "
    prefix (a validator's own words read better without it)."""
    msg = error["msg"].removeprefix(VALUE_ERROR_PREFIX) if plain else error["msg"]
    return f"{path}: {msg}" if path else msg


def one_line(errors: Iterable[ErrorDetails], where: Callable[[ErrorDetails], str] = field_path) -> str:
    """Every problem, `; `-separated; `where` names each error's field."""
    return "; ".join(problem(e, where(e)) for e in errors)
