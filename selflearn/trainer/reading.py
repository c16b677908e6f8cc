"""Reading pairs (RAFT, Zhang et al. 2024): part of a round's question/answer pairs asked after
passages, as serving asks with its memory on, so the model learns to use a passage that holds the
answer and to answer from its weights past one that does not (`training.qaReading`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from ..memory import passages_of
from ..sources.base import Article
from .qa import QAPair

# Blocks shorter than this train no reading pairs: a passage, a question and an answer rarely fit
# (at maxLength 128, 3 of 18 pairs did, too few to teach reading, enough to move a 16-prompt format
# check by one answer).
MIN_READING_TOKENS = 256


@dataclass(frozen=True)
class Reading:
    """Part of a round's pairs asked as serving asks with memory on (RAFT, Zhang et al. 2024): after
    the passage holding the answer and one from another article of the round, in either order, or,
    one time in `distractor_only`, after the other article's passage alone, so the model learns both
    to read a passage that holds the answer and to answer from its weights past one that does not."""

    share: float  # of the round's pairs
    max_tokens: int  # an example longer than this drops its distractor, then its passages
    seed: int
    distractor_only: int = 5
    passage_chars: int = 240  # a round's blocks are short (local mode: 256 tokens)


def reading_contexts(pairs: Sequence[QAPair], articles: Sequence[Article],
                     reading: Reading) -> dict[int, list[tuple[tuple[str, str], ...]]]:
    """For the pairs asked after passages: their contexts, fullest first."""
    by_title = {a.title: a for a in articles}
    if reading.share <= 0 or len(by_title) < 2:
        return {}
    rng = random.Random(reading.seed)
    chosen = [i for i in range(len(pairs)) if rng.random() < reading.share]

    def passage(article: Article, answer: str) -> tuple[str, str]:
        parts = passages_of(article, "", max_chars=reading.passage_chars)
        own = next((p for p in parts if answer[:40] in p.text), parts[0])
        return own.title, own.text[:reading.passage_chars * 2]

    out: dict[int, list[tuple[tuple[str, str], ...]]] = {}
    for n, i in enumerate(chosen):
        pair = pairs[i]
        if pair.title not in by_title:
            continue
        other = by_title[rng.choice([t for t in by_title if t != pair.title])]
        own, distractor = passage(by_title[pair.title], pair.answer), passage(other, other.text[:40])
        if n % reading.distractor_only == reading.distractor_only - 1:
            out[i] = [(distractor,)]
        else:
            both = (own, distractor) if rng.random() < 0.5 else (distractor, own)
            out[i] = [both, (own,)]
    return out
