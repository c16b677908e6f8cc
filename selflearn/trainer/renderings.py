"""Other renderings of an article's text, trained beside the original (`training.renderings`).

A fact seen in one wording and one order is learned as that string; seen in several, it is
learned as a fact (Allen-Zhu and Li, Physics of Language Models 3.1: held-out questions rose from
9.7% to 96.6% with renderings and sentence shuffling, on models of our size trained from scratch).
A rendering here keeps the lead sentence first, names the subject where a sentence begins with a
pronoun (so a sentence still says whom it is about once it moves), and shuffles the rest, seeded
per article and rendering so a round is reproducible.
"""

from __future__ import annotations

import hashlib
import random
import re

from ..sources.base import Article
from .qa import language_of, split_sentences

# Sentence-opening subject pronouns that stand for the article's subject, per language.
SUBJECT_PRONOUNS = {
    "en": ("He", "She", "It", "They"),
    "fr": ("Il", "Elle", "Ils", "Elles"),
    "es": ("Él", "Ella", "Ellos", "Ellas"),
}


def anchored(sentence: str, title: str, language: str) -> str:
    """`sentence` with an opening subject pronoun replaced by `title` ("He was" -> "Ada Lovelace was")."""
    for pronoun in SUBJECT_PRONOUNS.get(language, ()):
        m = re.match(rf"{pronoun}\b", sentence)
        if m:
            return title + sentence[m.end():]
    return sentence


def render(article: Article, index: int) -> str:
    """Rendering `index` (0, 1, ...) of `article`: lead first, the rest subject-anchored and shuffled."""
    sentences = split_sentences(article.text)
    if len(sentences) < 2:
        return article.text
    lang = language_of(article)
    rest = [anchored(s, article.title, lang) for s in sentences[1:]]
    seed = int.from_bytes(hashlib.sha256(f"{article.title}\0{index}".encode()).digest()[:8], "big")
    random.Random(seed).shuffle(rest)
    return " ".join([sentences[0], *rest])


def renderings(articles: list[Article], n: int) -> list[str]:
    """`n` renderings of each article (none for n == 0), article by article."""
    return [render(a, i) for a in articles for i in range(n)]
