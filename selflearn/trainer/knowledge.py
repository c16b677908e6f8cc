"""A round's chat side: what it trains in the form people ask, and what it measures as they see it.

    articles --qa.make_pairs--> questions/answers --prompting.render_example--> (ids, labels)
    + a replay of chat examples (the base model's own answers)       -> packed beside the raw text
    parent and candidate --probe--> knowledge (learned / held-out / general, in phrasings never
                                    trained; open book), chat retention

The shipped chat references (selflearn/data) are the embedded model's own answers. Another base
model gets its own, recorded once with its base weights into the run's store, so that retention
always means "still answers as this run's base model did".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..checkpoints import CheckpointStore
from ..memory import Memory, reading_prompt
from ..contracts import ChatMetrics, KnowledgeMetrics, Pair
from ..prompting import render_example
from ..sources.base import Article
from ..spec import MemoryUseSpec
from . import probe
from .distributed import SOLO, World
from .reading import Reading, reading_contexts
from .qa import PairGenerator, QAPair, language_of, make_pairs, pairs_for, templates_for

log = logging.getLogger("selflearn.trainer")

REFERENCES_KEY = "chat_references.json"
PROBE_NEW_TOKENS = 64  # a knowledge answer: a sentence or two
CHAT_NEW_TOKENS = 128  # the budget a retention answer must end its turn within
EXAMPLES_SHOWN = 4  # question/answer examples, parent vs candidate, kept in the manifest


@dataclass
class ChatData:
    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    pairs: list[QAPair] = field(default_factory=list)
    replayed: int = 0
    reviewed: int = 0
    read: int = 0  # pairs asked after passages (the reading share): the model learns to use its memory
    text_only: list[str] = field(default_factory=list)  # titles that yielded no pair: trained as text only


@dataclass(frozen=True)
class Replay:
    """Recorded chat answers trained again beside a round's examples: `n` of `items` a round,
    rotating through them from round to round (`replay_examples`)."""

    items: Sequence[dict[str, Any]]
    n: int
    round: int


def build_chat_data(tokenizer: Any, articles: Sequence[Article], *, per_article: int, replay: Replay | None = None,
                    generator: PairGenerator | None = None, review: Sequence[Article] = (),
                    reading: Reading | None = None) -> ChatData:
    """Chat examples for a round: the articles' pairs, ordered kind by kind across articles (so a
    block rarely holds two answers about one article, which could copy from each other), the
    first question of each `review` article (learned in an earlier round), then the replayed
    chat examples."""
    out = ChatData()
    by_article = pairs_for(articles, per_article=per_article, generator=generator)
    missing = sorted({language_of(a) for a in articles if templates_for(language_of(a)) is None})
    if missing:
        log.info("no question templates for language(s) %s: their articles train as raw text only", missing)
    columns: list[list[QAPair]] = []
    for a in articles:
        pairs = by_article.get(a.sha256 or a.title) or []
        if not pairs:
            out.text_only.append(a.title)
        columns.append(pairs)
    for depth in range(max((len(c) for c in columns), default=0)):
        out.pairs += [c[depth] for c in columns if len(c) > depth]
    reviewed = [pairs[0] for pairs in (make_pairs(a, per_article=1) for a in review) if pairs]
    out.reviewed = len(reviewed)
    contexts = reading_contexts(out.pairs, articles, reading) if reading else {}
    for i, p in enumerate(out.pairs + reviewed):
        example = render_example(tokenizer, [{"role": "user", "content": p.question}], p.answer)
        for context in contexts.get(i, ()):  # the fullest context that fits the block
            read = render_example(tokenizer, [{"role": "user", "content": reading_prompt(p.question, context)}],
                                  p.answer)
            if reading and len(read[0]) <= reading.max_tokens:
                example = read
                out.read += 1
                break
        out.examples.append(example)
    replayed = replay_examples(tokenizer, replay.items, replay.n, replay.round) if replay else []
    out.examples += replayed
    out.replayed = len(replayed)
    return out


def replay_examples(tokenizer: Any, replay: Sequence[dict], n: int, round_: int) -> list[tuple[list[int], list[int]]]:
    """`n` recorded chat answers as training examples. Categories are taken in turn, so that every
    round replays greetings, instructions, lists and refusals alike, and rounds rotate through the rest."""
    if not replay or not n:
        return []
    by_cat: dict[str, list[dict]] = {}
    for it in replay:
        by_cat.setdefault(it.get("category", ""), []).append(it)
    mixed = [c[i] for i in range(max(len(c) for c in by_cat.values())) for c in by_cat.values() if i < len(c)]
    start = (round_ - 1) * n
    return [render_example(tokenizer, [{"role": "user", "content": it["prompt"]}], it["answer"])
            for it in (mixed[(start + i) % len(mixed)] for i in range(n))]


# -- references ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatReferences:
    """This run's base model's own answers to fixed chat prompts: `retention`, on which the gate
    measures the chat's manners, and `replay`, trained again beside each round's examples."""

    retention: list[dict[str, Any]]
    replay: list[dict[str, Any]]

    @classmethod
    def recorded(cls, doc: Any, base_model: str) -> ChatReferences | None:
        """The references a run's store holds (`references` recorded them), if they are `base_model`'s."""
        try:
            rec = _Recorded.model_validate(doc)
        except ValidationError:
            return None
        return cls(rec.retention, rec.replay) if rec.model == base_model else None


class _Recorded(BaseModel):
    """`<run>/chat_references.json`: the references recorded with a base model's weights."""

    model: str
    retention: list[dict[str, Any]]
    replay: list[dict[str, Any]]


def _answered(model: Any, tokenizer: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`items` with the model's own answers to their prompts (a written answer is kept as written)."""
    items = [dict(it) for it in items]
    fresh = [it for it in items if not it.get("written")]
    gens = probe.generate(model, tokenizer, [it["prompt"] for it in fresh], max_new_tokens=CHAT_NEW_TOKENS)
    for it, g in zip(fresh, gens):
        it["answer"], it["ended"] = g.text or it["answer"], g.ended
    return items


def references(base_model: str, store: CheckpointStore, run: str, model: Any, tokenizer: Any,
               recorded_from: str) -> ChatReferences:
    """The chat references of this run's base model (see the module doc)."""
    retention, replay = probe.chat_references(probe.RETENTION_FILE), probe.chat_references(probe.REPLAY_FILE)
    if retention.get("model") == base_model and replay.get("model") == base_model:
        return ChatReferences(retention["items"], replay["items"])
    key = f"{run}/{REFERENCES_KEY}"
    stored = ChatReferences.recorded(store.get_json(key), base_model)
    if stored is not None:
        return stored
    t0 = time.time()
    # Replay trains on these: only answers that ended are worth teaching.
    kept = _answered(model, tokenizer, retention["items"])
    replayed = [it for it in _answered(model, tokenizer, replay["items"]) if it.get("ended") or it.get("written")]
    refs = ChatReferences(kept, replayed)
    store.put_json(key, {"model": base_model, "recorded_from": recorded_from, **dataclasses.asdict(refs)})
    log.info("recorded chat references for %s from %s in %.0fs", base_model, recorded_from, time.time() - t0)
    return refs


# -- measuring -------------------------------------------------------------------------------------------
# Learned articles a round also asks about with the article in the prompt, and with its memory
# (and as many held-out questions with memory). Four, not eight: these prompts carry ~300 tokens of
# passages, and at eight they were a third of a round's probe time (bench/knowledge.py asks all).
OPEN_BOOK_ARTICLES = 4


@dataclass
class ProbeSets:
    """The probe's questions (`probe.questions_for`: probe-only phrasings, and the reverse question
    where an article allows it), per set, and the open-book questions about learned articles."""

    learned: list[probe.Question]
    held_out: list[probe.Question]
    general: list[probe.Question]
    retention: list[dict]
    open_book: list[probe.Question] = field(default_factory=list)
    memory_use: MemoryUseSpec = field(default_factory=MemoryUseSpec)  # how the with-memory questions search

    @classmethod
    def of(cls, learned: Sequence[Article], held_out: Sequence[Article], general: Sequence[Article],
           retention: Sequence[dict], *, phrasings: int = 1, open_book: int = OPEN_BOOK_ARTICLES,
           memory_use: MemoryUseSpec = MemoryUseSpec()) -> "ProbeSets":
        """`phrasings` probe forms per article (a round asks one, rotating through the forms from
        article to article; the bench asks all); `open_book`: how many learned articles are also
        asked with their lead in the prompt."""
        def qs(arts: Sequence[Article]) -> list[probe.Question]:
            return [q for i, a in enumerate(arts) for q in probe.questions_for(a, phrasings=phrasings, offset=i)]

        books = [probe.open_book(q, a) for i, a in enumerate(learned[:open_book])
                 for q in probe.questions_for(a, phrasings=1, offset=i, reverse=False)]
        return cls(qs(learned), qs(held_out), qs(general), list(retention), books, memory_use)


def fingerprint(sets: ProbeSets, precision: str) -> str:
    """Identifies what a model's answers on the fixed sets (general, retention) depend on besides
    its weights, so a later round can reuse them for the same weights."""
    import hashlib

    doc = {"general": [q.__dict__ for q in sets.general], "retention": sets.retention, "precision": precision,
           "tokens": [PROBE_NEW_TOKENS, CHAT_NEW_TOKENS], "version": 2}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class KnownProbe(BaseModel):
    """What a later round may reuse of a model's report (`ProbeReport.reusable`, kept in the
    manifest and, for the base model, in the store): its answers on the fixed sets (general,
    retention), which depend only on its weights and on what `fingerprint` identifies."""

    model_config = ConfigDict(frozen=True)

    fingerprint: str
    general: list[dict[str, Any]]
    chat_ppl: float | None = None
    format_ok: float | None = None
    format_failures: list[dict[str, Any]]

    @field_validator("general")
    @classmethod
    def _scored(cls, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not all(isinstance(r.get("score"), (int, float)) for r in rows):
            raise ValueError("every answer has a score")
        return rows

    @classmethod
    def parse(cls, doc: object) -> KnownProbe | None:
        """A stored report (an S3 object, a manifest field) of the shape `reusable` writes, else None."""
        try:
            return cls.model_validate(doc)
        except ValidationError:
            return None


@dataclass(frozen=True)
class ProbeReport:
    """One model's answers on the probe sets: per set, each question's row (title, question,
    answer, score in [0, 1]); on the retention prompts, its reference perplexity and format health."""

    answers: dict[str, list[dict[str, Any]]]  # learned | held_out | general
    chat_ppl: float | None
    format_ok: float | None
    format_failures: list[dict[str, Any]]
    fingerprint: str  # what the fixed sets' answers depend on besides the weights
    reused: bool = False  # the fixed sets' answers are an earlier measurement's of the same weights
    seconds: float = 0.0

    @property
    def knowledge(self) -> dict[str, float | None]:
        """The mean score per set (None: nothing was asked)."""
        return {name: sum(r["score"] for r in rows) / len(rows) if rows else None
                for name, rows in self.answers.items()}

    def reusable(self) -> dict[str, Any]:
        """What a round whose parent has these weights can reuse (`KnownProbe`'s document)."""
        return {"fingerprint": self.fingerprint, "general": self.answers.get("general", []),
                "chat_ppl": self.chat_ppl, "format_ok": self.format_ok, "format_failures": self.format_failures}


def measure(model: torch.nn.Module, tokenizer: Any, sets: ProbeSets, *, block: int, precision: str,
            known: KnownProbe | None = None, memory: Memory | None = None, world: World = SOLO) -> ProbeReport:
    """One model's answers: knowledge per set (with each answer), chat ppl and format health.

    `known`: this same model's answers on the fixed sets from an earlier measurement (see
    `ProbeReport.reusable`); with a matching fingerprint they are taken instead of generated again.
    With several ranks every rank calls this alike and generates its share of the batches; each
    gets the whole report.
    """
    t0 = time.time()
    fp = fingerprint(sets, precision)
    prior = known if known is not None and known.fingerprint == fp else None
    names = ("learned", "held_out") if prior else ("learned", "held_out", "general")
    answers = _asked_together(model, tokenizer, {n: getattr(sets, n) for n in names}, world)
    # With its memory, as serving answers: the open-book articles' questions and as many held-out ones.
    asked = [q.question for q in sets.open_book]
    mem_learned = [probe.with_memory(q, memory, sets.memory_use) for q in sets.learned if q.question in asked]
    mem_held = [probe.with_memory(q, memory, sets.memory_use) for q in sets.held_out if q.kind == "ask"]
    # Asked apart from the short questions (a batch pads every row to its longest prompt, and these
    # carry ~300 tokens of article or passages), but together: a batch's cost is mostly its decode
    # steps, so one batch of open-book and with-memory questions takes ~2 s less than two.
    answers.update(_asked_together(model, tokenizer, {
        "open_book": sets.open_book, "memory_learned": mem_learned,
        "memory_held_out": mem_held[:max(len(mem_learned), len(sets.open_book))]}, world))
    if prior:
        answers["general"] = prior.general
        chat_ppl, format_ok, failures = prior.chat_ppl, prior.format_ok, prior.format_failures
    else:
        chat_ppl = probe.perplexity_of_references(model, tokenizer, sets.retention, block=block, precision=precision,
                                                  world=world)
        format_ok, failures = probe.format_check(model, tokenizer, sets.retention, max_new_tokens=CHAT_NEW_TOKENS,
                                                 world=world)
    return ProbeReport(answers, chat_ppl, format_ok, failures, fp, reused=prior is not None,
                       seconds=round(time.time() - t0, 1))


def _asked_together(model: torch.nn.Module, tokenizer: Any, groups: dict[str, list[probe.Question]],
                    world: World = SOLO) -> dict[str, list[dict[str, Any]]]:
    """The greedy answers to every group's questions, generated in one call, by group."""
    rows = probe.ask(model, tokenizer, [q for qs in groups.values() for q in qs], max_new_tokens=PROBE_NEW_TOKENS,
                     world=world)
    out, i = {}, 0
    for name, qs in groups.items():
        out[name], i = rows[i:i + len(qs)], i + len(qs)
    return out


SETS = ("learned", "held_out", "general", "open_book", "memory_learned", "memory_held_out")


def compare(before: ProbeReport, after: ProbeReport) -> tuple[ProbeMetrics, dict[str, Any]]:
    """-> (metrics for the gate and the dashboard, what the manifest keeps for people to read)."""
    def pair(a: float | None, b: float | None) -> Pair:
        return Pair(before=None if a is None else round(a, 4), after=None if b is None else round(b, 4))

    retention = probe.retention(before.chat_ppl, after.chat_ppl)
    known_before, known_after = before.knowledge, after.knowledge
    metrics = ProbeMetrics(
        knowledge=KnowledgeMetrics(
            **{k: pair(known_before.get(k), known_after.get(k)) for k in SETS if known_after.get(k) is not None},
            asked={k: len(after.answers.get(k) or []) for k in SETS}),
        chat=ChatMetrics(ppl=pair(before.chat_ppl, after.chat_ppl),
                         retention=None if retention is None else round(retention, 4),
                         format_ok=pair(before.format_ok, after.format_ok)),
        probe_seconds=round(before.seconds + after.seconds, 1),
        parent_probe_reused=before.reused)
    examples = []
    for b, a in zip(before.answers.get("learned", []), after.answers.get("learned", [])):
        examples.append({"question": a["question"], "parent": b["answer"], "candidate": a["answer"],
                         "parent_score": b["score"], "candidate_score": a["score"]})
    examples.sort(key=lambda e: e["candidate_score"] - e["parent_score"], reverse=True)
    shown = {"examples": examples[:EXAMPLES_SHOWN], "reusable": after.reusable(),
             "answers": {"parent": before.answers, "candidate": after.answers},
             "format_failures": {"parent": before.format_failures, "candidate": after.format_failures}}
    return metrics, shown


def load_generator(path: str | None) -> PairGenerator | None:
    """An optional pair generator hook, `module:function` taking an Article, returning QAPairs."""
    if not path:
        return None
    import importlib

    mod, _, fn = path.partition(":")
    if not mod or not fn:
        raise ValueError(f"training.pairGenerator {path!r} must look like 'package.module:function'")
    try:
        hook: Callable = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"training.pairGenerator {path!r} cannot be imported: {err}") from None
    return hook


def summary_line(metrics: ProbeMetrics) -> str:
    return json.dumps({"event": "probed", "knowledge": metrics.knowledge.model_dump(mode="json", exclude_none=True),
                       "chat_retention": metrics.chat.retention,
                       "format_ok": metrics.chat.format_ok.model_dump(mode="json") if metrics.chat.format_ok else None})


@dataclass(frozen=True)
class ProbeMetrics:
    """What the probes measured of parent and candidate, as the round's metrics carry it."""

    knowledge: KnowledgeMetrics
    chat: ChatMetrics
    probe_seconds: float
    parent_probe_reused: bool
