"""The promotion policy: one pure function, shared by `selflearn local` and the operator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .contracts import Pair, RoundMetrics

if TYPE_CHECKING:
    from .spec import LearnerRunSpec


class Outcome(str, Enum):
    PROMOTE = "promote"  # the candidate serves from now on
    PIN = "pin"  # the pinned checkpoint serves (a rollback); the candidate is not promoted
    KEEP = "keep"  # nothing changes: pinned and already serving it, or no candidate
    REJECT = "reject"  # the candidate failed a check; what serves stays


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    # What should serve after this decision (the candidate, the pin), or None: unchanged.
    serve: str | None
    reason: str  # for people: the check that decided, and what passed or was skipped

    @property
    def promote(self) -> bool:
        return self.outcome is Outcome.PROMOTE


def promoted_after(decision: Decision | None) -> str | None:
    """The checkpoint the run stands on after `decision`: the promoted candidate or the pin, even
    when it serves already (local mode's store pointer follows it); None: unchanged."""
    if decision is None or decision.outcome not in (Outcome.PROMOTE, Outcome.PIN):
        return None
    return decision.serve


def switch_to(decision: Decision | None, serving: str | None) -> str | None:
    """What serving must move to after `decision` (both drivers act on this): what the run now
    stands on (`promoted_after`) when it is not what serves already; None: stay."""
    target = promoted_after(decision)
    return target if target is not None and target != serving else None


@dataclass(frozen=True)
class Checks:
    """Which of the gate's checks a run's spec turns on. A check that is on and finds its input
    missing from the round's metrics rejects the round; a check that is off is skipped, and the
    reason says so."""

    chat: bool  # format health, chat retention, knowledge of the learned articles (training.chatEval)
    fresh: bool  # fresh held-out articles' perplexity (training.evalArticles > 0)
    preference: bool  # corrections preferred on held-out phrasings (a feedback source)

    @classmethod
    def of(cls, spec: LearnerRunSpec) -> Checks:
        t = spec.training
        return cls(chat=t.chat_eval, fresh=t.eval_articles > 0, preference=spec.feedback is not None)


class _Rejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decide(spec: LearnerRunSpec, metrics: RoundMetrics | None, *, candidate: str | None,
           serving: str | None = None) -> Decision:
    """Promote `candidate` (the round's checkpoint; `serving`: what serves now) under the limits of
    the run's `promotion` spec when, against the parent weights measured in the same round:

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

    The chat checks come first: they are what a user notices. Which checks run is the spec's
    (`Checks.of`); one whose input is missing rejects. A pinned checkpoint overrides everything
    (that is how rollback works). The reason names the check that decided."""
    pinned = spec.promotion.pinned_checkpoint
    if pinned:
        if serving == pinned:
            return Decision(Outcome.KEEP, None, f"pinned to {pinned}; not promoting")
        return Decision(Outcome.PIN, pinned, f"pinned to {pinned}")
    if not candidate or metrics is None:
        return Decision(Outcome.KEEP, None, "no candidate checkpoint")
    checks = Checks.of(spec)
    passed: list[str] = []  # what passed, in the reason of a promotion or after the rejecting check
    skipped: list[str] = []
    try:
        if checks.chat:
            passed += _chat(metrics, spec.promotion.min_chat_retention)
        else:
            skipped.append("chat and knowledge (training.chatEval is off)")
        if checks.preference:
            note, ran = _preference(metrics)
            (passed if ran else skipped).append(note)
        if checks.chat:
            note, ran = _knowledge(metrics, spec.promotion.max_knowledge_drop)
            (passed if ran else skipped).append(note)
        passed += _perplexity(metrics, checks, spec, passed, skipped)
    except _Rejected as err:
        return Decision(Outcome.REJECT, None, "rejected: " + err.reason)
    return Decision(Outcome.PROMOTE, candidate, "promoted: " + "; ".join(passed) + _skipped(skipped))


def _skipped(skipped: list[str]) -> str:
    return f"; skipped: {', '.join(skipped)}" if skipped else ""


def _missing(what: str, why: str) -> _Rejected:
    return _Rejected(f"{what} is missing from the round's metrics ({why}); the check cannot pass unmeasured")


def _chat(m: RoundMetrics, min_retention: float) -> list[str]:
    chat = m.chat
    fmt = chat.format_ok if chat else None
    if fmt is None or not fmt.known:
        raise _missing("chat format health", "training.chatEval is on")
    assert fmt.before is not None and fmt.after is not None
    if fmt.after < fmt.before:
        raise _Rejected(f"chat format health {fmt.before:.0%}->{fmt.after:.0%} "
                        "(answers that end their turn without looping or drifting)")
    kept = chat.retention if chat else None
    if kept is None:
        raise _missing("chat retention", "training.chatEval is on")
    if not math.isfinite(kept) or kept < min_retention:
        raise _Rejected(f"chat retention {kept:.3f} below {min_retention:.3f}")
    return [f"format {fmt.after:.0%}", f"chat retention {kept:.3f}"]


def _preference(m: RoundMetrics) -> tuple[str, bool]:
    """-> (what the reason says, whether the check ran); raises _Rejected."""
    fb = m.feedback
    if fb is None:
        raise _missing("the feedback report", "the run has a feedback source")
    if not fb.pairs:
        return "corrections preferred (no correction of an earlier answer this round)", False
    pref = fb.preference
    if pref is None or pref.before is None or pref.after is None:
        raise _missing("the corrections' preference on held-out phrasings",
                       f"the round learned {fb.pairs} corrections of earlier answers")
    before, after = pref.before, pref.after
    # More often than the parent; a parent that already always agreed must be matched.
    if after < before or (after == before and before < 1.0):
        raise _Rejected(f"the users' corrections preferred on {after:.0%} of held-out phrasings, the parent "
                        f"{before:.0%} (must be more often)")
    return f"corrections preferred {before:.0%}->{after:.0%}", True


def _knowledge(m: RoundMetrics, max_drop: float) -> tuple[str, bool]:
    """-> (what the reason says, whether the check ran); raises _Rejected."""
    k = m.knowledge
    if k is None or k.asked is None:
        raise _missing("knowledge of the learned articles", "training.chatEval is on")
    if not k.asked.get("learned"):
        return "knowledge (no question could be asked about this round's articles)", False
    learned = k.learned or Pair()
    if not learned.known:
        raise _missing("knowledge of the learned articles", f"{k.asked['learned']} questions were asked")
    assert learned.before is not None and learned.after is not None
    if learned.after < learned.before - max_drop:
        raise _Rejected(f"knowledge of the learned articles {learned.before:.3f}->{learned.after:.3f} "
                        f"(may fall at most {max_drop:.3f})")
    return f"knowledge {learned.before:.3f}->{learned.after:.3f}", True


def _perplexity(m: RoundMetrics, checks: Checks, spec: LearnerRunSpec, passed: list[str],
                skipped: list[str]) -> list[str]:
    p = spec.promotion
    general = m.ppl.get("general")
    if general is None or not general.known:
        raise _missing("the general set's perplexity", "every round measures it")
    sets: list[tuple[str, Pair, float]] = [("general", general, p.max_perplexity_increase)]
    fresh = m.ppl.get("fresh")
    if not checks.fresh:
        skipped.append("fresh ppl (training.evalArticles is 0)")
    elif fresh is not None and fresh.known:
        sets.append(("fresh", fresh, p.max_fresh_perplexity_increase))
    elif m.held_out == 0:
        skipped.append("fresh ppl (no held-out article this round)")
    else:
        raise _missing("the fresh articles' perplexity", "training.evalArticles is above 0")
    notes: list[str] = []
    for name, pair, limit in sets:
        before, after = float(pair.before or 0.0), float(pair.after or 0.0)
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            raise _Rejected(f"{name} perplexity is not finite ({before} -> {after})")
        rise = after / before - 1.0
        notes.append(f"{name} ppl {before:.2f}->{after:.2f} ({rise:+.1%}, limit +{limit:.1%})")
        if rise > limit:
            # The perplexity that decided first, then what passed.
            raise _Rejected("; ".join(notes) + (f"; passed: {', '.join(passed)}" if passed else ""))
    return notes
