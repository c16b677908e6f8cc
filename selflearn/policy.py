"""The promotion policy: one pure function, shared by `selflearn local` and the operator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .spec import PromotionSpec


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


def decide(promotion: PromotionSpec, metrics: Mapping[str, Any] | None, *, candidate: str | None,
           serving: str | None = None) -> Decision:
    """Promote `candidate` (the round's checkpoint; `serving`: what serves now) under the limits of
    a LearnerRun's `promotion` spec when, against the parent weights measured in the same round:

    * its chat format health (greedy answers to the retention prompts that end their turn, do
      not loop, do not drift into an article) is not worse than the parent's;
    * its chat retention (parent's reference-answer perplexity over its own) is at least
      `minChatRetention`;
    * on the held-out phrasings of the users' corrections it learned, it prefers the correction
      over the old answer more often than the parent (a round that learned corrections);
    * its knowledge of the articles the round learned (scored on its answers) has not fallen more
      than `maxKnowledgeDrop` below the parent's;
    * its perplexity does not regress beyond the allowed fractions on the fixed general set and on
      fresh held-out articles.

    The chat checks come first: they are what a user notices. A round without chat metrics (a
    trainer with chatEval off) is judged on perplexity alone. A pinned checkpoint overrides
    everything (that is how rollback works). The reason names the check that decided."""
    pinned = promotion.pinned_checkpoint
    min_chat_retention, max_knowledge_drop = promotion.min_chat_retention, promotion.max_knowledge_drop
    if pinned:
        if serving == pinned:
            return Decision(False, None, f"pinned to {pinned}; not promoting")
        return Decision(False, pinned, f"pinned to {pinned}")
    if not candidate or metrics is None:
        return Decision(False, None, "no candidate checkpoint")
    notes: list[str] = []  # the chat checks passed
    chat = metrics.get("chat") or {}
    fmt = chat.get("format_ok") or {}
    if fmt.get("after") is not None and fmt.get("before") is not None:
        if float(fmt["after"]) < float(fmt["before"]):
            return Decision(False, None, f"rejected: chat format health {fmt['before']:.0%}->{fmt['after']:.0%} "
                                         "(answers that end their turn without looping or drifting)")
        notes.append(f"format {fmt['after']:.0%}")
    kept = chat.get("retention")
    if kept is not None:
        if not math.isfinite(float(kept)) or float(kept) < min_chat_retention:
            return Decision(False, None, f"rejected: chat retention {float(kept):.3f} below {min_chat_retention:.3f}")
        notes.append(f"chat retention {float(kept):.3f}")
    pref = (metrics.get("feedback") or {}).get("preference") or {}
    if pref.get("before") is not None and pref.get("after") is not None:
        before_p, after_p = float(pref["before"]), float(pref["after"])
        # More often than the parent; a parent that already always agreed must be matched.
        if after_p < before_p or (after_p == before_p and before_p < 1.0):
            return Decision(False, None, f"rejected: the users' corrections preferred on {after_p:.0%} of held-out "
                                         f"phrasings, the parent {before_p:.0%} (must be more often)")
        notes.append(f"corrections preferred {before_p:.0%}->{after_p:.0%}")
    learned = (metrics.get("knowledge") or {}).get("learned") or {}
    if learned.get("before") is not None and learned.get("after") is not None:
        before_k, after_k = float(learned["before"]), float(learned["after"])
        if after_k < before_k - max_knowledge_drop:
            return Decision(False, None, f"rejected: knowledge of the learned articles {before_k:.3f}->{after_k:.3f} "
                                         f"(may fall at most {max_knowledge_drop:.3f})")
        notes.append(f"knowledge {before_k:.3f}->{after_k:.3f}")
    general = _pair(metrics, "general")
    if general is None:
        return Decision(False, None, "rejected: no general-set perplexity in the round's metrics")
    checks = [("general", general, promotion.max_perplexity_increase)]
    fresh = _pair(metrics, "fresh")
    if fresh is not None:
        checks.append(("fresh", fresh, promotion.max_fresh_perplexity_increase))
    ppl_notes: list[str] = []
    for name, (before, after), limit in checks:
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            return Decision(False, None, f"rejected: {name} perplexity is not finite ({before} -> {after})")
        rise = after / before - 1.0
        ppl_notes.append(f"{name} ppl {before:.2f}->{after:.2f} ({rise:+.1%}, limit +{limit:.1%})")
        if rise > limit:
            # The perplexity that decided first, then what passed.
            passed = f"; passed: {', '.join(notes)}" if notes else ""
            return Decision(False, None, "rejected: " + "; ".join(ppl_notes) + passed)
    return Decision(True, candidate, "promoted: " + "; ".join(notes + ppl_notes))

