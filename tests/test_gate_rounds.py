"""The gate sees chat skill and knowledge: real rounds on the embedded model, judged by the one
promotion policy. A normal round is promoted; a round with an absurd learning rate, a poisoned
round (answers that contradict the articles) and a round of chat-free garbage are each rejected,
with the check that decided in the reason.

The normal round is the suite's shared one (conftest's `learned_round`, fast tier); the three
bad rounds are the full tier's (`make test-all`)."""

from __future__ import annotations

import random

import pytest

from selflearn.contracts import ChatMetrics, Pair
from selflearn.policy import decide
from selflearn.trainer.qa import QAPair, make_pairs

from tests.support.rounds import gate_config, judge

_DONOR_ANSWERS = [
    "It is a small village in the mountains of Peru, known for its wool market.",
    "It was a Danish football club founded in 1921 that dissolved in 1950.",
    "It is a species of freshwater snail found only in Lake Malawi.",
    "He was a Portuguese sailor who mapped the coast of Greenland in 1780.",
]


def poisoned(article):
    """A pair generator whose answers contradict the article (what a poisoned source would teach)."""
    rng = random.Random(article.title)
    return [QAPair(p.question, rng.choice(_DONOR_ANSWERS), p.kind, p.title) for p in make_pairs(article, per_article=3)]


def test_a_normal_round_is_promoted_and_knows_more(learned_round):
    res, d = learned_round.result, learned_round.decision
    k, chat = res.metrics.knowledge.learned, res.metrics.chat.format_ok
    assert d.promote, d.reason
    assert k.after > k.before, "it answers better about what it learned"
    assert chat.after >= chat.before
    assert "chat retention" in d.reason and "knowledge" in d.reason and d.reason.startswith("promoted")
    # Asked in words it never trained on: no probe question is one of the round's training pairs.
    store = learned_round.store
    manifest = store.manifest(store.ref_for_uri(res.checkpoint))
    trained = {p["question"] for p in manifest["qa_pairs"]}
    asked = {r["question"] for r in manifest["probe"]["answers"]["candidate"]["learned"]}
    assert asked and not asked & trained
    # The open-book ceiling is measured beside it, for parent and candidate.
    book = res.metrics.knowledge.open_book
    assert book is not None and book.known and res.metrics.knowledge.asked["open_book"] > 0
    # With its memory, as serving answers: the candidate's memory holds the round's articles, the
    # base model has none; the candidate's answers read the very article asked about.
    rows = manifest["probe"]["answers"]
    assert res.metrics.knowledge.memory_learned.known and res.metrics.knowledge.memory_held_out.known
    assert not any(r["read"] for r in rows["parent"]["memory_learned"])
    read_own = [r["title"] in r["read"] for r in rows["candidate"]["memory_learned"]]
    assert read_own and sum(read_own) >= len(read_own) - 1, rows["candidate"]["memory_learned"]  # one miss at most


# The bad rounds train in the shared round's store and run, from the base model: the base model's
# answers on the fixed probe sets are measured once for all of them.
@pytest.mark.full
def test_raw_text_at_an_absurd_learning_rate_breaks_the_chat_and_is_rejected(learned_round):
    res, d = judge(gate_config(learned_round.storage, format="text", learningRate=3.0e-3), learned_round.next_round())
    assert not d.promote and d.serve is None
    assert d.reason.startswith("rejected: chat"), d.reason
    assert res.metrics.chat.retention < 0.95


@pytest.mark.full
def test_a_poisoned_round_is_rejected_on_knowledge(learned_round):
    config = gate_config(learned_round.storage, learningRate=2.0e-4, format="chat", chatReplay=16,
                         pairGenerator="test_gate_rounds:poisoned")
    res, d = judge(config, learned_round.next_round())
    assert not d.promote and d.reason.startswith("rejected"), d.reason
    k = res.metrics.knowledge.learned
    assert k.after < k.before, "it now answers worse about the very articles it trained on"
    # Even a poisoning that kept every chat manner intact is caught: the knowledge check alone.
    chat_kept = res.metrics.model_copy(update={"chat": ChatMetrics(format_ok=Pair(before=1.0, after=1.0),
                                                                   retention=1.0)})
    alone = decide(config.spec, chat_kept, candidate=res.checkpoint)
    assert not alone.promote and alone.reason.startswith("rejected: knowledge of the learned articles"), alone.reason


@pytest.mark.full
def test_a_round_of_chat_free_garbage_is_rejected(learned_round, tmp_path):
    rng = random.Random(0)
    words = ["zq", "vlorp", "xx", "kek", "brr", "@@", "lorem", "0x1f", "qwop", "snarf"]
    for i in range(4):
        (tmp_path / f"junk{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    res, d = judge(gate_config(learned_round.storage, sources=[{"files": {"paths": [str(tmp_path)]}}], format="text",
                               learningRate=1.0e-3, evalArticles=0), learned_round.next_round())
    assert not d.promote
    assert d.reason.startswith("rejected"), d.reason
    assert "chat" in d.reason or "general" in d.reason
