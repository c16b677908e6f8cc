"""Question/answer pairs from an article, deterministically and grounded in its own sentences.

A model that only reads an article as language-model text learns its wording, not to answer
questions about it (the "perplexity curse", Jiang et al. 2024); knowledge becomes extractable
when training also shows it as the questions people ask, in varied forms (Allen-Zhu & Li,
Physics of Language Models 3.1). So each article becomes several pairs:

    define    What is / Who was <title>?           -> the first sentence
    more      What else do you know about <title>? -> the sentences after the first
    summary   Tell me about <title>.               -> the first two sentences
    when      What happened with <title> in <year>? -> a later sentence naming that year
    relation  How is <title> connected to <name>?  -> a later sentence naming that entity
    where     Where is <title>?                     -> a sentence placing it (geography)
    described I read about <title> (<description>)... -> the first sentences

Every answer is made of the article's own sentences, so nothing is invented; the questions use
the title, the summary's `description`, years and capitalised names found in the text. No model
is involved. Templates exist for en, fr and es; `templates_for` says when a language has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..sources.base import Article


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    kind: str
    title: str


@dataclass(frozen=True)
class Templates:
    who_was: str
    who_is: str
    what_was: str
    what_is: str
    summary: str
    more: str
    when: str
    where: str
    relation: str
    described: str
    named: str  # {c}: copula, {p}: what the first sentence says of the subject; answered with that sentence
    people_topics: frozenset[str]
    place_topics: frozenset[str]
    past_copulas: tuple[str, ...]
    present_copulas: tuple[str, ...]
    joiners: frozenset[str]  # lower-case words allowed inside a multi-word name


TEMPLATES: dict[str, Templates] = {
    "en": Templates(
        who_was="Who was {t}?", who_is="Who is {t}?", what_was="What was {t}?", what_is="What is {t}?",
        summary="Tell me about {t}.", more="What else do you know about {t}?",
        when="What happened with {t} in {y}?", where="Where is {t}?", relation="How is {t} connected to {e}?",
        described="I read about {t} ({d}). What can you tell me?",
        named="What is the name of the one that {c} {p}?",
        people_topics=frozenset({"People"}), place_topics=frozenset({"Geography"}),
        past_copulas=("was", "were"), present_copulas=("is", "are"),
        joiners=frozenset({"of", "the", "de", "von", "van", "and", "del", "da"})),
    "fr": Templates(
        who_was="Qui était {t} ?", who_is="Qui est {t} ?", what_was="Qu'était {t} ?", what_is="Qu'est-ce que {t} ?",
        summary="Parle-moi de {t}.", more="Que sais-tu d'autre sur {t} ?",
        when="Que s'est-il passé pour {t} en {y} ?", where="Où se trouve {t} ?",
        relation="Quel est le lien entre {t} et {e} ?",
        described="J'ai lu quelque chose sur {t} ({d}). Que peux-tu m'en dire ?",
        named="Quel est le nom de celui qui {c} {p} ?",
        people_topics=frozenset({"Personnalités"}), place_topics=frozenset({"Géographie"}),
        past_copulas=("était", "fut", "étaient", "furent"), present_copulas=("est", "sont"),
        joiners=frozenset({"de", "du", "des", "la", "le", "les", "d'", "et", "von"})),
    "es": Templates(
        who_was="¿Quién fue {t}?", who_is="¿Quién es {t}?", what_was="¿Qué fue {t}?", what_is="¿Qué es {t}?",
        summary="Háblame de {t}.", more="¿Qué más sabes sobre {t}?",
        when="¿Qué pasó con {t} en {y}?", where="¿Dónde está {t}?", relation="¿Qué relación hay entre {t} y {e}?",
        described="Leí sobre {t} ({d}). ¿Qué me puedes contar?",
        named="¿Cómo se llama el que {c} {p}?",
        people_topics=frozenset({"Personas"}), place_topics=frozenset({"Geografía"}),
        past_copulas=("fue", "era", "fueron", "eran"), present_copulas=("es", "son"),
        joiners=frozenset({"de", "del", "la", "las", "los", "el", "y", "von"})),
}


@dataclass(frozen=True)
class ProbeTemplates:
    """How the knowledge probe asks (trainer/probe.py): phrasings no training pair ever uses, so the
    probe measures knowledge the weights can give when asked in new words, not recitation of the
    strings they trained on. `reverse` asks back from the article's first fact to its subject."""

    asks: tuple[str, ...]  # {t}: the title
    reverse: str  # {c}: the first sentence's copula, {p}: what it says of the subject


PROBE_TEMPLATES: dict[str, ProbeTemplates] = {
    "en": ProbeTemplates(asks=("What should I know about {t}?", "Explain {t} briefly.",
                               "Describe {t} in a few words."),
                         reverse="Who or what {c} {p}?"),
    "fr": ProbeTemplates(asks=("Que faut-il savoir sur {t} ?", "Explique brièvement {t}.",
                               "Décris {t} en quelques mots."),
                         reverse="Qui ou qu'est-ce qui {c} {p} ?"),
    "es": ProbeTemplates(asks=("¿Qué debería saber sobre {t}?", "Explica brevemente {t}.",
                               "Describe {t} en pocas palabras."),
                         reverse="¿Quién o qué {c} {p}?"),
}


def probe_templates_for(language: str) -> ProbeTemplates | None:
    return PROBE_TEMPLATES.get((language or "").split("-")[0].lower())


def _fact_of_subject(article: Article, first: str, t: Templates) -> tuple[str, str] | None:
    """(copula, what it says) when the first sentence opens with the title (a parenthesis or an
    apposition may follow it) and a copula, and says at least four words of it; else None."""
    title = re.sub(r"\s*\([^)]*\)$", "", article.title).strip()  # "Mercury (planet)" opens "Mercury is"
    if not title or not first.lower().startswith(title.lower()):
        return None
    rest = _YEARS_PAREN.sub("", first[len(title):])
    rest = re.sub(r"^\s*\([^)]*\)", "", rest)  # "(born 1952)", "(Spanish: ...)"
    m = re.match(r"^\s*(?:,[^,]{1,80},)?\s*(\S+)\s+(.+?)[.!?]?$", rest)
    if m is None or m.group(1).lower() not in (*t.past_copulas, *t.present_copulas):
        return None
    said = m.group(2).strip().rstrip(",;:")
    return (m.group(1).lower(), said) if len(said.split()) >= 4 else None


def reverse_question(article: Article, first: str, language: str) -> str | None:
    """The probe's question from the first sentence's fact back to its subject: "Francisco Morazán
    was a Central American politician who ..." -> "Who or what was a Central American politician
    who ...?" (None where `_fact_of_subject` finds no such fact)."""
    t, pt = templates_for(language), probe_templates_for(language)
    fact = _fact_of_subject(article, first, t) if t is not None and pt is not None else None
    return pt.reverse.format(c=fact[0], p=fact[1]) if pt is not None and fact else None


# The order pairs are taken in when an article yields more than `per_article`: the question
# everyone asks first, then the rest of the article's facts, then other phrasings of the same.
KINDS = ("define", "more", "summary", "when", "relation", "where", "described")

# Words before a full stop that do not end a sentence.
_ABBREV = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "e.g", "i.e", "approx", "no",
                     "mt", "ft", "inc", "ltd", "co", "u.s", "u.k", "sra", "sr", "av", "j.-c", "apr", "mme", "m"})
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"“«¿¡(]?[A-ZÀ-ÖØ-Þ0-9])")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_YEARS_PAREN = re.compile(r"\s*\([^)]*\d{3,4}[^)]*\)")
_LIFESPAN = re.compile(r"\d{3,4}\s*[–-]\s*\d{3,4}|\b(born|née?|nacid[oa])\b", re.I)
_WORD = re.compile(r"[\wÀ-ÿ'’-]+")
MAX_ANSWER_CHARS = 600


def templates_for(language: str) -> Templates | None:
    """The language's templates (`en`, `fr`, `es`; `en-us` counts as `en`), None if it has none."""
    return TEMPLATES.get((language or "").split("-")[0].lower())


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, not cut after abbreviations or initials ("J. R. R. Tolkien")."""
    parts = _SPLIT.split(" ".join(text.split()))
    out: list[str] = []
    for part in parts:
        if out:
            last = out[-1].rstrip(".").rsplit(" ", 1)[-1].lower()
            if last in _ABBREV or (len(last) == 1 and last.isalpha()):
                out[-1] = f"{out[-1]} {part}"
                continue
        out.append(part)
    return [s.strip() for s in out if s.strip()]


def language_of(article: Article) -> str:
    """An article's language from its source (`snapshot:fr` -> `fr`); English when it names none."""
    src = article.source or ""
    return src.split(":", 1)[1] if ":" in src else "en"


def _first_copula(sentence: str, t: Templates) -> str | None:
    for w in _WORD.findall(sentence.lower()):
        if w in t.past_copulas:
            return "past"
        if w in t.present_copulas:
            return "present"
    return None


def _define_question(article: Article, first: str, t: Templates) -> str:
    topic = (article.extra or {}).get("topic") or ""
    description = (article.extra or {}).get("description") or ""
    tense = _first_copula(first, t)
    person = topic in t.people_topics or bool(_LIFESPAN.search(description))
    past = tense == "past" or (person and bool(re.search(r"\d{3,4}\s*[–-]\s*\d{3,4}", description)))
    if person:
        return (t.who_was if past else t.who_is).format(t=article.title)
    return (t.what_was if past else t.what_is).format(t=article.title)


def _names(sentence: str, title: str, t: Templates) -> list[str]:
    """Capitalised names in `sentence` (not its first word, not the title's words)."""
    words = sentence.split()
    title_words = {w.lower().strip(",.;:()") for w in title.split()}
    names, cur = [], []
    for i, raw in enumerate(words):
        w = raw.strip(",.;:()\"“”«»")
        cap = bool(w) and w[0].isupper() and i > 0 and w.lower() not in title_words
        if cap:
            cur.append(w)
        elif cur and w.lower() in t.joiners:
            cur.append(w)
        else:
            while cur and cur[-1].lower() in t.joiners:
                cur.pop()
            if cur:
                names.append(" ".join(cur))
            cur = []
        if raw[-1:] in ",.;:)" and cur:
            names.append(" ".join(cur))
            cur = []
    if cur:
        names.append(" ".join(cur))
    return [n for n in names if len(n) >= 4 and not _YEAR.fullmatch(n)]


def _clip(sentences: Sequence[str]) -> str:
    """Whole sentences, as many as fit in MAX_ANSWER_CHARS (at least one)."""
    out: list[str] = []
    for s in sentences:
        if out and len(" ".join(out + [s])) > MAX_ANSWER_CHARS:
            break
        out.append(s)
    return " ".join(out)


def make_pairs(article: Article, *, language: str | None = None, per_article: int = 4,
               named: bool = False) -> list[QAPair]:
    """Up to `per_article` grounded pairs about `article`, most useful first; [] without templates.
    `named`: one more pair, asked from the first sentence's fact back to the subject (answered with
    that sentence), where the sentence allows it."""
    t = templates_for(language or language_of(article))
    sentences = split_sentences(article.text)
    if t is None or not sentences or per_article <= 0:
        return []
    title = article.title
    first = sentences[0]
    found: dict[str, list[QAPair]] = {k: [] for k in KINDS}

    def add(kind: str, question: str, answer: str) -> None:
        found[kind].append(QAPair(question=question, answer=answer, kind=kind, title=title))

    add("define", _define_question(article, first, t), first)
    if len(sentences) > 1:
        add("summary", t.summary.format(t=title), _clip(sentences[:2]))
        add("more", t.more.format(t=title), _clip(sentences[1:4]))
    years_seen, names_seen = set(), set()
    for s in sentences[1:]:
        year = next((y for y in _YEAR.findall(s) if y not in years_seen), None)
        if year:
            years_seen.add(year)
            add("when", t.when.format(t=title, y=year), s)
            continue
        name = next((n for n in _names(s, title, t) if n not in names_seen), None)
        if name:
            names_seen.add(name)
            add("relation", t.relation.format(t=title, e=name), s)
    topic = (article.extra or {}).get("topic") or ""
    if topic in t.place_topics:
        placed = next((s for s in sentences if _names(s, title, t)), None)
        if placed:
            add("where", t.where.format(t=title), placed)
    description = _YEARS_PAREN.sub("", (article.extra or {}).get("description") or "").strip()
    if description:
        add("described", t.described.format(t=title, d=description[:1].lower() + description[1:]),
            _clip(sentences[:2]))
    # Round-robin over kinds in priority order: several kinds before a second pair of any one kind.
    out: list[QAPair] = []
    depth = 0
    while len(out) < per_article and any(len(v) > depth for v in found.values()):
        for kind in KINDS:
            if len(found[kind]) > depth and len(out) < per_article:
                out.append(found[kind][depth])
        depth += 1
    fact = _fact_of_subject(article, first, t) if named else None
    if fact:
        out.append(QAPair(question=t.named.format(c=fact[0], p=fact[1]), answer=first, kind="named", title=title))
    return out


# A hook that returns pairs for an article (for example from the served model); it replaces the
# built-in generator for the articles it answers (a non-empty list).
PairGenerator = Callable[[Article], list[QAPair]]


def pairs_for(articles: Iterable[Article], *, per_article: int = 4,
              generator: PairGenerator | None = None) -> dict[str, list[QAPair]]:
    """-> {article sha256 or title: pairs}; an article that yields none maps to []."""
    out: dict[str, list[QAPair]] = {}
    for a in articles:
        pairs = generator(a) if generator else []
        out[a.sha256 or a.title] = pairs or make_pairs(a, per_article=per_article)
    return out
