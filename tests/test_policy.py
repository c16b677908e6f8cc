"""The promotion policy (selflearn.policy.decide): promote, reject on either regression, pin, bad
numbers, and a check the spec turns on whose input is missing (a renamed metric) rejecting."""

from __future__ import annotations

import math

import pytest

from selflearn.contracts import RoundMetrics
from selflearn.policy import Outcome, decide, promoted_after, switch_to
from selflearn.spec import parse_spec

CAND = "file:///s/run/r000002"
SERVING = "file:///s/run/r000001"


def metrics(general=(20.0, 19.0), fresh=(30.0, 28.0)):
    m = {"ppl": {"general": {"before": general[0], "after": general[1]}}}
    if fresh:
        m["ppl"]["fresh"] = {"before": fresh[0], "after": fresh[1]}
    return m


def spec(*, chat_eval=False, eval_articles=8, feedback=False, **promotion):
    """A run's spec: the gate with general +2% and fresh +5% allowed, `promotion` (field names) on top."""
    return parse_spec({"training": {"chatEval": chat_eval, "evalArticles": eval_articles},
                       "sources": [{"snapshot": {}}, *([{"feedback": {}}] if feedback else [])],
                       "promotion": {"maxPerplexityIncrease": 0.02, "maxFreshPerplexityIncrease": 0.05, **promotion}})


def gate(m, pinned=None, **limits):
    """The gate on metrics document `m` (chat checks on when it has chat metrics)."""
    candidate, serving = limits.pop("candidate", CAND), limits.pop("serving", SERVING)
    chat_eval = limits.pop("chat_eval", bool(m and "chat" in m))
    run = spec(chat_eval=chat_eval, pinnedCheckpoint=pinned, **limits)
    return decide(run, None if m is None else RoundMetrics.parse(m), candidate=candidate, serving=serving)


def test_promotes_when_nothing_regresses():
    d = gate(metrics())
    assert d.promote and d.serve == CAND
    assert d.reason.startswith("promoted") and "general ppl 20.00->19.00" in d.reason


def test_small_rise_within_limits_still_promotes():
    d = gate(metrics(general=(20.0, 20.3), fresh=(30.0, 31.0)))  # +1.5% general, +3.3% fresh
    assert d.promote, d.reason


def test_rejects_general_rise_beyond_limit():
    d = gate(metrics(general=(20.0, 21.0)))  # +5%
    assert not d.promote and d.serve is None
    assert d.reason.startswith("rejected") and "general" in d.reason and "+5.0%" in d.reason


def test_rejects_fresh_rise_beyond_limit():
    d = gate(metrics(general=(20.0, 19.5), fresh=(30.0, 33.0)))  # fresh +10%
    assert not d.promote and d.serve is None
    assert d.reason.startswith("rejected") and "fresh ppl 30.00->33.00" in d.reason


def test_no_fresh_set_judges_on_general_only_when_the_spec_measures_none():
    d = decide(spec(eval_articles=0), RoundMetrics.parse(metrics(fresh=None)), candidate=CAND)
    assert d.promote and "fresh ppl (training.evalArticles is 0)" in d.reason.split("skipped: ")[1]
    # Held-out articles asked for, but the round had none to hold out: said, not failed.
    d = gate({**metrics(fresh=None), "held_out": 0})
    assert d.promote and "fresh ppl (no held-out article this round)" in d.reason.split("skipped: ")[1]


def test_missing_general_set_rejects():
    d = gate({"ppl": {"fresh": {"before": 3.0, "after": 2.0}}})
    assert d.outcome is Outcome.REJECT and "general set's perplexity is missing" in d.reason


def test_a_check_the_spec_turns_on_rejects_when_its_input_is_missing():
    """What a trainer renaming a metric would cause: a rejection naming it, never a skipped check."""
    d = gate(metrics(fresh=None))  # evalArticles 8 and held-out articles, but no fresh ppl
    assert d.outcome is Outcome.REJECT and d.reason.startswith("rejected: the fresh articles' perplexity is missing")
    no_chat = decide(spec(chat_eval=True), RoundMetrics.parse(metrics()), candidate=CAND)
    assert no_chat.outcome is Outcome.REJECT and "chat format health is missing" in no_chat.reason
    renamed = chat_metrics()
    renamed["knowledge"] = {"learned_articles": {"before": 0.2, "after": 0.4}, "asked": {"learned": 5}}
    d = gate(renamed)
    assert d.outcome is Outcome.REJECT and "knowledge of the learned articles is missing" in d.reason
    # Nothing to ask about (no article yielded a question) is said, not failed.
    nothing = chat_metrics()
    nothing["knowledge"] = {"asked": {"learned": 0}}
    d = gate(nothing)
    assert d.promote and "skipped: knowledge (no question could be asked" in d.reason


def test_the_corrections_check_runs_when_the_round_learned_corrections():
    base = chat_metrics()
    run = spec(chat_eval=True, feedback=True)
    missing = decide(run, RoundMetrics.parse(base), candidate=CAND)
    assert missing.outcome is Outcome.REJECT and "the feedback report is missing" in missing.reason
    none = decide(run, RoundMetrics.parse({**base, "feedback": {"corrections": 0}}), candidate=CAND)
    assert none.promote and "skipped: corrections preferred (no correction" in none.reason
    unmeasured = decide(run, RoundMetrics.parse({**base, "feedback": {"corrections": 3, "pairs": 3}}), candidate=CAND)
    assert unmeasured.outcome is Outcome.REJECT and "preference on held-out phrasings is missing" in unmeasured.reason
    better = {**base, "feedback": {"corrections": 3, "pairs": 3, "preference": {"before": 0.4, "after": 0.9, "pairs": 3}}}
    d = decide(run, RoundMetrics.parse(better), candidate=CAND)
    assert d.promote and "corrections preferred 40%->90%" in d.reason
    worse = {**base, "feedback": {"corrections": 3, "pairs": 3, "preference": {"before": 0.6, "after": 0.5, "pairs": 3}}}
    assert decide(run, RoundMetrics.parse(worse), candidate=CAND).outcome is Outcome.REJECT


def test_checks_the_spec_turns_off_are_skipped_and_said():
    d = gate(metrics(), chat_eval=False)
    assert d.promote and "skipped: chat and knowledge (training.chatEval is off)" in d.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_perplexity_rejects(bad):
    d = gate(metrics(general=(20.0, bad)))
    assert not d.promote and d.serve is None and "not finite" in d.reason
    d = gate(metrics(fresh=(bad, 20.0)))
    assert not d.promote and "not finite" in d.reason


def test_pinned_rolls_back_and_blocks_promotion():
    pin = "file:///s/run/r000001"
    d = gate(metrics(), serving="file:///s/run/r000003", pinned=pin)
    assert d.outcome is Outcome.PIN and not d.promote and d.serve == pin and "pinned" in d.reason
    assert switch_to(d, "file:///s/run/r000003") == pin
    # Already on the pin: nothing moves, even for a great candidate.
    d = gate(metrics(general=(20.0, 10.0)), serving=pin, pinned=pin)
    assert d.outcome is Outcome.KEEP and d.serve is None and switch_to(d, pin) is None


def test_no_candidate():
    d = gate(None, candidate=None)
    assert d.outcome is Outcome.KEEP and d.serve is None


def test_what_serving_moves_to_follows_the_outcome_not_the_reason():
    promoted = gate(metrics())
    assert promoted.outcome is Outcome.PROMOTE and switch_to(promoted, SERVING) == CAND
    assert switch_to(promoted, CAND) is None  # already serving it
    assert promoted_after(promoted) == CAND  # ... yet the run stands on it (local mode's store pointer)
    rejected = gate(metrics(general=(20.0, 30.0)))
    assert rejected.outcome is Outcome.REJECT and switch_to(rejected, SERVING) is None
    assert promoted_after(rejected) is None and promoted_after(None) is None
    pin = "file:///s/run/r000001"
    pinned = gate(metrics(), serving="file:///s/run/r000003", pinned=pin)
    assert promoted_after(pinned) == pin and switch_to(pinned, pin) is None


def chat_metrics(*, fmt=(1.0, 1.0), retention=0.99, learned=(0.2, 0.4), general=(20.0, 19.0)):
    m = metrics(general=general)
    m["chat"] = {"format_ok": {"before": fmt[0], "after": fmt[1]}, "retention": retention}
    m["knowledge"] = {"learned": {"before": learned[0], "after": learned[1]}, "asked": {"learned": 6}}
    return m


def test_chat_and_knowledge_checks_promote_a_good_round_and_say_so():
    d = gate(chat_metrics())
    assert d.promote, d.reason
    assert "format 100%" in d.reason and "chat retention 0.990" in d.reason and "knowledge 0.200->0.400" in d.reason


def test_a_round_that_breaks_the_chat_format_is_rejected_first():
    d = gate(chat_metrics(fmt=(1.0, 0.75), retention=0.5, learned=(0.2, 0.1)))
    assert not d.promote and d.reason.startswith("rejected: chat format health 100%->75%")


def test_chat_retention_below_the_limit_is_rejected():
    d = gate(chat_metrics(retention=0.9))
    assert not d.promote and d.reason == "rejected: chat retention 0.900 below 0.950"
    assert gate(chat_metrics(retention=0.9), min_chat_retention=0.85).promote
    assert not gate(chat_metrics(retention=float("nan"))).promote


def test_knowledge_of_the_learned_articles_may_not_fall():
    d = gate(chat_metrics(learned=(0.3, 0.2)))
    assert not d.promote and d.reason.startswith("rejected: knowledge of the learned articles 0.300->0.200")
    assert gate(chat_metrics(learned=(0.3, 0.25)), max_knowledge_drop=0.1).promote


def test_decide_reads_the_limits_from_the_promotion_spec():
    m = RoundMetrics.parse(chat_metrics())
    assert not decide(spec(chat_eval=True, minChatRetention=0.995), m, candidate=CAND).promote
    assert decide(spec(chat_eval=True), m, candidate=CAND).promote
    pinned = decide(spec(chat_eval=True, pinnedCheckpoint=SERVING), m, candidate=CAND, serving=CAND)
    assert pinned.serve == SERVING
