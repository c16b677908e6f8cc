"""training.renderings: the article retold with its lead first, its subject named, the rest shuffled."""

from __future__ import annotations

from selflearn.sources.base import Article
from selflearn.trainer.qa import split_sentences
from selflearn.trainer.renderings import anchored, render, renderings

ADA = Article(title="Ada Lovelace", url="u", source="snapshot:en", text=(
    "Ada Lovelace was an English mathematician and writer. She is chiefly known for her work on "
    "Charles Babbage's Analytical Engine. Her notes hold the first published algorithm. "
    "It was meant for a machine that was never built. She died in 1852 in London."))


def test_a_rendering_keeps_every_fact_names_the_subject_and_moves_the_rest():
    out = render(ADA, 0)
    sentences = split_sentences(out)
    assert sentences[0] == "Ada Lovelace was an English mathematician and writer."
    assert "Ada Lovelace is chiefly known for her work on Charles Babbage's Analytical Engine." in sentences
    assert "Ada Lovelace died in 1852 in London." in sentences
    assert "Her notes hold the first published algorithm." in sentences  # only subject pronouns are replaced
    assert len(sentences) == len(split_sentences(ADA.text))
    assert render(ADA, 0) == out  # reproducible
    others = {render(ADA, i) for i in range(1, 6)}
    assert len(others | {out}) > 1  # different renderings order the sentences differently


def test_renderings_per_language_and_count():
    assert anchored("Il fut président.", "Francisco Morazán", "fr") == "Francisco Morazán fut président."
    assert anchored("Ella nació en Lima.", "Chabuca Granda", "es") == "Chabuca Granda nació en Lima."
    assert anchored("Italy is a country.", "X", "en") == "Italy is a country."  # "It" as a word only
    assert renderings([ADA], 0) == [] and len(renderings([ADA, ADA], 2)) == 4
    one = Article(title="T", url="u", source="snapshot:en", text="Just one sentence here.")
    assert render(one, 1) == one.text
