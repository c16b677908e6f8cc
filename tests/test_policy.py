"""The promotion policy (selflearn.policy.decide): promote, reject on either regression, pin, bad numbers."""

from __future__ import annotations

import math

import pytest

from selflearn.policy import decide
from selflearn.spec import PromotionSpec

CAND = "file:///s/run/r000002"
SERVING = "file:///s/run/r000001"


def metrics(general=(20.0, 19.0), fresh=(30.0, 28.0)):
    m = {"ppl": {"general": {"before": general[0], "after": general[1]}}}
    if fresh:
        m["ppl"]["fresh"] = {"before": fresh[0], "after": fresh[1]}
    return m


def gate(m, pinned=None, **limits):
    """The gate with general +2% and fresh +5% allowed, and `limits` (spec field names) on top."""
    candidate, serving = limits.pop("candidate", CAND), limits.pop("serving", SERVING)
    promotion = PromotionSpec(max_perplexity_increase=0.02, max_fresh_perplexity_increase=0.05,
                              pinned_checkpoint=pinned, **limits)
    return decide(promotion, m, candidate=candidate, serving=serving)


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


def test_no_fresh_set_judges_on_general_only():
    assert gate(metrics(fresh=None)).promote


def test_missing_general_set_rejects():
    d = gate({"ppl": {"fresh": {"before": 3.0, "after": 2.0}}})
    assert not d.promote and "general" in d.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_perplexity_rejects(bad):
    d = gate(metrics(general=(20.0, bad)))
    assert not d.promote and d.serve is None and "not finite" in d.reason
    d = gate(metrics(fresh=(bad, 20.0)))
    assert not d.promote and "not finite" in d.reason


def test_pinned_rolls_back_and_blocks_promotion():
    pin = "file:///s/run/r000001"
    d = gate(metrics(), serving="file:///s/run/r000003", pinned=pin)
    assert not d.promote and d.serve == pin and "pinned" in d.reason
    # Already on the pin: nothing moves, even for a great candidate.
    d = gate(metrics(general=(20.0, 10.0)), serving=pin, pinned=pin)
    assert not d.promote and d.serve is None and "pinned" in d.reason


def test_no_candidate():
    d = gate(None, candidate=None)
    assert not d.promote and d.serve is None


def chat_metrics(*, fmt=(1.0, 1.0), retention=0.99, learned=(0.2, 0.4), general=(20.0, 19.0)):
    m = metrics(general=general)
    m["chat"] = {"format_ok": {"before": fmt[0], "after": fmt[1]}, "retention": retention}
    m["knowledge"] = {"learned": {"before": learned[0], "after": learned[1]}}
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
    strict = PromotionSpec(minChatRetention=0.995)
    assert not decide(strict, chat_metrics(), candidate=CAND).promote
    assert decide(PromotionSpec(), chat_metrics(), candidate=CAND).promote
    pinned = decide(PromotionSpec(pinnedCheckpoint=SERVING), chat_metrics(), candidate=CAND, serving=CAND)
    assert pinned.serve == SERVING
