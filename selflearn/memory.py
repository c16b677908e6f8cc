"""The run's memory: every article its line of checkpoints learned, split into passages and indexed
for search, kept in each checkpoint beside the weights.

A checkpoint's memory is self-contained: its parent's passages plus the round's own articles, so
a rejected round's articles never reach the served memory, a rollback rolls the memory back with
the weights, and deleting old checkpoints never breaks a newer one. Its files are ordinary
checkpoint files (listed with their sha256 in the manifest, verified at download):

    memory/memory.json       format, language, the search library and its version, passage count
    memory/passages.jsonl    one passage a line: title, url, text, learned_in (the checkpoint id)
    memory/index/            the BM25 index (bm25s: sparse matrices and vocabulary)

Search is BM25 with Snowball stemming (bm25s, PyStemmer); question words and stopwords are left
out of the query, so small talk ("hello, how are you?") matches nothing. A passage is put in front
of a question only when its score reaches the threshold. An index written by another bm25s
version, or one that fails to load, is rebuilt from passages.jsonl; unreadable passages refuse the
memory (MemoryUnreadable), never half-load it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .sources.base import Article

if TYPE_CHECKING:
    import bm25s

log = logging.getLogger("selflearn.memory")

MEMORY_DIR = "memory"
FORMAT = 1
PASSAGE_CHARS = 600  # whole sentences up to about this many characters a passage
# The BM25 score a passage needs when the question describes it rather than naming its title.
# Measured on 300 snapshot articles a language, 3 probe phrasings and the reverse question each
# (en: 344 questions), and one question about each of 200 articles not in memory: at 5.0, en found
# 343 of 344 (none another article's first), 43 of 44 reverse questions, and matched 8 of the 200
# unlearned (by a learned title naming the subject); 3.0 let "Write me a poem about the sea." read
# a passage on Hafez. es: 327 of 327 (3 another's first), fr: 309 of 309 (9), 7 and 5 unlearned.
DEFAULT_THRESHOLD = 5.0
# Snowball's name and bm25s' stopword list per language; other languages are searched as English.
LANGUAGES = {"en": ("english", "en"), "fr": ("french", "fr"), "es": ("spanish", "es")}
# Words every question has and no passage is about: they would match anything.
ASKING = {
    "en": "what who whom whose which when where why how tell know explain describe please could would can "
          "you your me my i hello hi hey thanks thank ok okay about briefly few words should",
    "fr": "que quoi qui quel quelle quels quelles quand où pourquoi comment dis explique décris sais tu te toi "
          "moi je bonjour salut merci peux pourrais faut savoir brièvement quelques mots",
    "es": "qué que quién quiénes cuál cuándo dónde por cómo dime explica describe sabes tú te me yo hola "
          "gracias puedes podrías debería saber brevemente pocas palabras",
}


class MemoryUnreadable(ValueError):
    """A checkpoint's memory cannot be read; the checkpoint is refused, as for a corrupt weight file."""


@dataclass(frozen=True)
class Passage:
    title: str
    url: str
    text: str
    learned_in: str  # the id of the checkpoint whose round learned the article: <run>/r000003


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


def passages_of(article: Article, learned_in: str, *, max_chars: int = PASSAGE_CHARS) -> list[Passage]:
    """`article` in passages of whole sentences (about `max_chars` each), each naming its title."""
    from .trainer.qa import split_sentences

    out: list[Passage] = []
    cur: list[str] = []
    for sentence in split_sentences(article.text):
        if cur and len(" ".join(cur + [sentence])) > max_chars:
            out.append(Passage(article.title, article.url or "", " ".join(cur), learned_in))
            cur = []
        cur.append(sentence)
    if cur:
        out.append(Passage(article.title, article.url or "", " ".join(cur), learned_in))
    return out


def _library_version() -> str:
    import bm25s

    return str(bm25s.__version__)


class Memory:
    """The passages and their index; `search` is safe from several threads (it only reads)."""

    def __init__(self, passages: Sequence[Passage], language: str, retriever: bm25s.BM25 | None):
        self.passages = tuple(passages)
        self.language = language if language in LANGUAGES else "en"
        self._retriever = retriever
        self._stemmer: Any = None

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, passages: Sequence[Passage], language: str = "en") -> Memory:
        mem = cls(passages, language, None)
        if mem.passages:
            import bm25s

            retriever = bm25s.BM25()
            # The title is part of what a passage is about: "Who was Morazán?" finds his passages.
            retriever.index(mem._tokens([f"{p.title}. {p.text}" for p in mem.passages]), show_progress=False)
            mem._retriever = retriever
        return mem

    def grown(self, articles: Iterable[Article], learned_in: str) -> Memory:
        """This memory plus `articles` (a round's), as a new memory."""
        new = [p for a in articles for p in passages_of(a, learned_in)]
        return Memory.build(self.passages + tuple(new), self.language) if new else self

    def save(self, checkpoint_dir: Path) -> None:
        d = Path(checkpoint_dir) / MEMORY_DIR
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "passages.jsonl", "w", encoding="utf-8") as f:
            for p in self.passages:
                f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
        if self._retriever is not None:
            self._retriever.save(str(d / "index"), show_progress=False)
        (d / "memory.json").write_text(json.dumps({
            "format": FORMAT, "language": self.language, "passages": len(self.passages),
            "library": "bm25s", "library_version": _library_version()}, indent=1))

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint_dir: Path) -> Memory | None:
        """The memory in a downloaded checkpoint; None for a checkpoint made before memories existed.
        Raises MemoryUnreadable when it is there but cannot be read."""
        d = Path(checkpoint_dir) / MEMORY_DIR
        if not d.is_dir():
            return None
        try:
            meta = json.loads((d / "memory.json").read_text())
            if meta.get("format") != FORMAT:
                raise MemoryUnreadable(f"memory format {meta.get('format')!r} is not {FORMAT}")
            passages = [Passage(**json.loads(line)) for line in
                        (d / "passages.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError, TypeError) as err:
            raise MemoryUnreadable(f"the checkpoint's memory cannot be read: {type(err).__name__}: {err}") from None
        if len(passages) != meta.get("passages"):
            raise MemoryUnreadable(f"the memory lists {meta.get('passages')} passages, passages.jsonl holds {len(passages)}")
        language = str(meta.get("language") or "en")
        if not passages:
            return cls([], language, None)
        if meta.get("library") == "bm25s" and meta.get("library_version") == _library_version():
            import bm25s

            try:
                retriever = bm25s.BM25.load(str(d / "index"), show_progress=False)
                if retriever.scores["num_docs"] == len(passages):
                    return cls(passages, language, retriever)
                log.warning("the memory's index covers %s passages, not %d: rebuilding it",
                            retriever.scores["num_docs"], len(passages))
            except Exception as err:  # a truncated or foreign file: the passages are the truth
                log.warning("the memory's index cannot be loaded (%s: %s): rebuilding it", type(err).__name__, err)
        else:
            log.info("the memory's index was written by %s %s: rebuilding it with bm25s %s",
                     meta.get("library"), meta.get("library_version"), _library_version())
        t0 = time.monotonic()
        mem = cls.build(passages, language)
        log.info("rebuilt the memory's index of %d passages in %.1f s", len(passages), time.monotonic() - t0)
        return mem

    # -- search ------------------------------------------------------------------------------------
    def _stem(self) -> Any:
        if self._stemmer is None:
            import Stemmer

            self._stemmer = Stemmer.Stemmer(LANGUAGES[self.language][0])
        return self._stemmer

    def _stopwords(self) -> list[str]:
        import bm25s.stopwords as sw

        listed = {"en": sw.STOPWORDS_EN, "fr": sw.STOPWORDS_FRENCH, "es": sw.STOPWORDS_SPANISH}[self.language]
        return [*listed, *ASKING[self.language].split()]

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(texts, stopwords=self._stopwords(), stemmer=self._stem(), return_ids=False,
                              show_progress=False)

    def search(self, query: str, *, k: int = 2, threshold: float = DEFAULT_THRESHOLD) -> list[Hit]:
        """The best `k` passages for `query`, best first: those scoring at least `threshold` that
        hold more than half of the query's words (after stopwords and question words), so a
        question about something else that shares one word with a passage gets nothing."""
        if self._retriever is None or not query.strip() or k <= 0:
            return []
        asked = set(self._tokens([query])[0])
        if not asked:
            return []
        docs, scores = self._retriever.retrieve([sorted(asked)], k=min(k, len(self.passages)), show_progress=False,
                                                n_threads=1)
        hits = []
        for i, score in zip(docs[0], scores[0]):
            p = self.passages[int(i)]
            if float(score) <= 0:
                continue
            # Named: the passage's title holds most of what is asked ("Who was Morazán?"). Described:
            # its text holds most of it, and scores high enough ("Who was the Central American ...?").
            named = len(asked & set(self._tokens([p.title])[0])) > len(asked) / 2
            described = float(score) >= threshold and \
                len(asked & set(self._tokens([f"{p.title}. {p.text}"])[0])) > len(asked) / 2
            if named or described:
                hits.append(Hit(p, round(float(score), 3)))
        return hits


def reading_prompt(question: str, passages: Sequence[tuple[str, str]]) -> str:
    """A user's question with passages to read before it, `(title, text)` each: what the open-book
    probe asks and what serving sends when its memory has something on the question."""
    notes = "\n\n".join(f"{title}: {text}" for title, text in passages)
    return f"{notes}\n\n{question}" if notes else question
