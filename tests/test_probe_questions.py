"""The knowledge probe asks in words no round trains on: its figure is knowledge the weights can
give when asked anew, not recitation of their training strings (issue 27's honest measurement)."""

from __future__ import annotations

import re

import pytest

from selflearn.sources.base import Article
from selflearn.sources.snapshot import load_snapshot
from selflearn.trainer import knowledge, probe
from selflearn.trainer.qa import PROBE_TEMPLATES, TEMPLATES, make_pairs, reverse_question

MORAZAN = Article(
    title="Francisco Morazán", url="https://en.wikipedia.org/wiki/Francisco_Moraz%C3%A1n", source="snapshot:en",
    text="Francisco Morazán (3 October 1792 – 15 September 1842) was a Central American politician who served "
         "as president of the Federal Republic of Central America from 1830 to 1839. Before he was president, he "
         "was head of state of Honduras.")


def skeleton(form: str) -> str:
    """A template with its slots blanked: what stays the same whatever the article."""
    return re.sub(r"\{\w\}", "_", form).lower()


@pytest.mark.parametrize("language", sorted(PROBE_TEMPLATES))
def test_no_probe_phrasing_is_a_training_phrasing(language):
    train = {skeleton(f) for f in vars(TEMPLATES[language]).values() if isinstance(f, str)}
    probe_forms = {skeleton(f) for f in (*PROBE_TEMPLATES[language].asks, PROBE_TEMPLATES[language].reverse)}
    assert not train & probe_forms
    # ... and on real articles: not one question the probe asks is one a round trains on.
    for i, art in enumerate(load_snapshot(language)[:400]):
        trained = {p.question for p in make_pairs(art, per_article=16, named=True)}
        asked = {q.question for q in probe.questions_for(art, phrasings=3, offset=i)}
        assert not trained & asked, art.title


def test_a_round_asks_one_form_per_article_rotating_and_the_bench_all_three():
    arts = [MORAZAN, *load_snapshot("en")[:5]]
    sets = knowledge.ProbeSets.of(arts, [], [], [], open_book=2)
    asks = [q.question for q in sets.learned if q.kind == "ask"]
    assert len(asks) == len(arts)
    used = {next(f for f in PROBE_TEMPLATES["en"].asks if skeleton(f).split("_")[0] in q.lower()) for q in asks}
    assert len(used) == 3  # six articles, each form asked twice
    bench = knowledge.ProbeSets.of([MORAZAN], [], [], [], phrasings=3)
    assert [q.question for q in bench.learned] == [
        "What should I know about Francisco Morazán?", "Explain Francisco Morazán briefly.",
        "Describe Francisco Morazán in a few words.",
        "Who or what was a Central American politician who served as president of the Federal Republic of "
        "Central America from 1830 to 1839?"]


def test_the_reverse_question_is_scored_on_the_subject_not_on_repeating_the_question():
    rev = next(q for q in probe.questions_for(MORAZAN) if q.kind == "reverse")
    assert rev.score("That was Francisco Morazán.") == 1.0
    assert rev.score("Morazán, a Honduran general.") == 0.5
    # Repeating the fact back is no answer to "who".
    assert rev.score("He was a Central American politician who served as president.") == 0.0


@pytest.mark.parametrize("title,first,language,expected", [
    ("Mercury (planet)", "Mercury is the first planet from the Sun and the smallest in the Solar System.", "en",
     "Who or what is the first planet from the Sun and the smallest in the Solar System?"),
    ("Paris", "Paris, the capital of France, is a city of two million people on the Seine.", "en",
     "Who or what is a city of two million people on the Seine?"),
    ("Le Louvre", "Le Louvre est un musée d'art situé à Paris.", "fr",
     "Qui ou qu'est-ce qui est un musée d'art situé à Paris ?"),
    ("Rosalía", "Rosalía es una cantante y compositora española de flamenco.", "es",
     "¿Quién o qué es una cantante y compositora española de flamenco?"),
    # Not the subject first, or too little said of it: no reverse question.
    ("Paris", "The city of Paris is the capital of France.", "en", None),
    ("Ogham", "Ogham is an alphabet.", "en", None),
    ("Mercury", "Mercury is the first planet from the Sun.", "de", None),
])
def test_reverse_questions_only_where_the_first_sentence_names_the_subject(title, first, language, expected):
    art = Article(title=title, url="u", source=f"snapshot:{language}", text=first)
    assert reverse_question(art, first, language) == expected


def test_open_book_puts_the_articles_lead_before_the_same_question():
    q = probe.questions_for(MORAZAN)[0]
    book = probe.open_book(q, MORAZAN)
    assert book.question == q.question and book.prompt.endswith("\n\n" + q.question)
    assert "Federal Republic of Central America" in book.prompt and q.prompt == q.question
    assert book.prompt.startswith("Francisco Morazán: Francisco Morazán (3 October 1792")
    long = Article(title="L", url="u", source="snapshot:en", text="word " * 2000)
    assert [len(text) for _, text in probe.open_book(q, long).context or ()] == [probe.OPEN_BOOK_CHARS]
    sets = knowledge.ProbeSets.of([MORAZAN, *load_snapshot("en")[:20]], [], [], [])
    assert len(sets.open_book) == knowledge.OPEN_BOOK_ARTICLES
    assert all(b.context and b.kind == "ask" for b in sets.open_book)


def test_with_memory_the_question_reads_what_the_memory_finds_as_serving_would():
    from selflearn.memory import Memory
    from selflearn.spec import MemoryUseSpec

    q = probe.questions_for(MORAZAN)[0]
    mem = Memory.build([], "en").grown([MORAZAN, *load_snapshot("en")[:5]], "run/r000001")
    read = probe.with_memory(q, mem, MemoryUseSpec())
    assert read.context and read.context[0][0] == "Francisco Morazán" and read.question == q.question
    assert probe.with_memory(q, None, MemoryUseSpec()).prompt == q.question  # no memory: the question alone
    assert probe.with_memory(probe.questions_for(load_snapshot("en")[900])[0], mem, MemoryUseSpec()).context is None
