"""The promotion policy: one pure function, shared by `selflearn local` and the operator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Decision:
    promote: bool
    # What should serve after this decision (the candidate, the pin, or unchanged: None).
    serve: str | None
    reason: str


def _pair(metrics: Mapping[str, Any], name: str) -> tuple[float, float] | None:
    ppl = (metrics.get("ppl") or {}).get(name) or {}
    before, after = ppl.get("before"), ppl.get("after")
    if before is None or after is None:
        return None
    return float(before), float(after)


def decide(
    metrics: Mapping[str, Any] | None,
    *,
    candidate: str | None,
    max_general_increase: float,
    max_fresh_increase: float,
    pinned: str | None = None,
    serving: str | None = None,
) -> Decision:
    """Promote `candidate` when its perplexity does not regress beyond the allowed fractions
    against the parent weights measured in the same round, on the fixed general set and on fresh
    held-out articles. A pinned checkpoint overrides everything (that is how rollback works)."""
    if pinned:
        if serving == pinned:
            return Decision(False, None, f"pinned to {pinned}; not promoting")
        return Decision(False, pinned, f"pinned to {pinned}")
    if not candidate or metrics is None:
        return Decision(False, None, "no candidate checkpoint")
    general = _pair(metrics, "general")
    if general is None:
        return Decision(False, None, "rejected: no general-set perplexity in the round's metrics")
    checks = [("general", general, max_general_increase)]
    fresh = _pair(metrics, "fresh")
    if fresh is not None:
        checks.append(("fresh", fresh, max_fresh_increase))
    notes = []
    for name, (before, after), limit in checks:
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            return Decision(False, None, f"rejected: {name} perplexity is not finite ({before} -> {after})")
        rise = after / before - 1.0
        notes.append(f"{name} ppl {before:.2f}->{after:.2f} ({rise:+.1%}, limit +{limit:.1%})")
        if rise > limit:
            return Decision(False, None, "rejected: " + "; ".join(notes))
    return Decision(True, candidate, "promoted: " + "; ".join(notes))
