"""A round's chat side: what it trains in the form people ask, and what it measures as they see it.

    articles --qa.make_pairs--> questions/answers --prompting.render_example--> (ids, labels)
    + a replay of chat examples (the base model's own answers)       -> packed beside the raw text
    parent and candidate --probe--> knowledge (learned / held-out / general), chat retention

The shipped chat references (selflearn/data) are the embedded model's own answers. Another base
model gets its own, recorded once with its base weights into the run's store, so that retention
always means "still answers as this run's base model did".
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..contracts import ChatMetrics, KnowledgeMetrics, Pair
from ..prompting import render_example
from ..sources.base import Article
from . import probe
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
    text_only: list[str] = field(default_factory=list)  # titles that yielded no pair: trained as text only


def build_chat_data(tokenizer: Any, articles: Sequence[Article], *, per_article: int, replay: Sequence[dict],
                    replay_n: int, round_: int, generator: PairGenerator | None = None,
                    review: Sequence[Article] = ()) -> ChatData:
    """Chat examples for a round: the articles' pairs, ordered kind by kind across articles (so a
    block rarely holds two answers about one article, which could copy from each other), the
    first question of each `review` article (learned in an earlier round), then `replay_n`
    replayed chat examples, rotating through the replay set from round to round."""
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
    for p in out.pairs + reviewed:
        out.examples.append(render_example(tokenizer, [{"role": "user", "content": p.question}], p.answer))
    replayed = replay_examples(tokenizer, replay, replay_n, round_)
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
def references(base_model: str, store: Any, run: str, model: Any, tokenizer: Any,
               recorded_from: str) -> dict[str, list[dict]]:
    """{"retention": items, "replay": items} for this run's base model (see the module doc)."""
    shipped = {"retention": probe.chat_references(probe.RETENTION_FILE),
               "replay": probe.chat_references(probe.REPLAY_FILE)}
    if all(doc.get("model") == base_model for doc in shipped.values()):
        return {k: doc["items"] for k, doc in shipped.items()}
    key = f"{run}/{REFERENCES_KEY}"
    stored = store.get_json(key)
    if isinstance(stored, dict) and stored.get("model") == base_model:
        return {"retention": stored["retention"], "replay": stored["replay"]}
    t0 = time.time()
    doc: dict[str, Any] = {"model": base_model, "recorded_from": recorded_from}
    for name, ref in shipped.items():
        items = [dict(it) for it in ref["items"]]
        fresh = [it for it in items if not it.get("written")]
        gens = probe.generate(model, tokenizer, [it["prompt"] for it in fresh], max_new_tokens=CHAT_NEW_TOKENS)
        for it, g in zip(fresh, gens):
            it["answer"], it["ended"] = g.text or it["answer"], g.ended
        # Replay trains on these: only answers that ended are worth teaching.
        doc[name] = items if name == "retention" else [it for it in items if it.get("ended") or it.get("written")]
    store.put_json(key, doc)
    log.info("recorded chat references for %s from %s in %.0fs", base_model, recorded_from, time.time() - t0)
    return {"retention": doc["retention"], "replay": doc["replay"]}


# -- measuring -------------------------------------------------------------------------------------------
@dataclass
class ProbeSets:
    learned: list[probe.Question]
    held_out: list[probe.Question]
    general: list[probe.Question]
    retention: list[dict]

    @classmethod
    def of(cls, learned: Sequence[Article], held_out: Sequence[Article], general: Sequence[Article],
           retention: Sequence[dict]) -> "ProbeSets":
        def qs(arts):
            return [q for q in (probe.question_for(a) for a in arts) if q is not None]

        return cls(qs(learned), qs(held_out), qs(general), list(retention))


def fingerprint(sets: ProbeSets, precision: str) -> str:
    """Identifies what a model's answers on the fixed sets (general, retention) depend on besides
    its weights, so a later round can reuse them for the same weights."""
    import hashlib

    doc = {"general": [q.__dict__ for q in sets.general], "retention": sets.retention, "precision": precision,
           "tokens": [PROBE_NEW_TOKENS, CHAT_NEW_TOKENS], "version": 1}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


FIXED_PARTS = ("chat_ppl", "format_ok", "format_failures")


def reusable(report: dict[str, Any], fp: str) -> dict[str, Any]:
    """The part of a model's report that a round whose parent has these weights can reuse."""
    return {"fingerprint": fp, "general": report["answers"].get("general", []),
            **{k: report[k] for k in FIXED_PARTS}}


def _valid_known(known: Any) -> bool:
    """A stored report (an S3 object, a manifest field) has the shape `reusable` writes."""
    return (isinstance(known, dict) and isinstance(known.get("fingerprint"), str)
            and isinstance(known.get("general"), list)
            and all(isinstance(r, dict) and isinstance(r.get("score"), (int, float)) for r in known["general"])
            and isinstance(known.get("chat_ppl"), (int, float, type(None)))
            and isinstance(known.get("format_ok"), (int, float, type(None)))
            and isinstance(known.get("format_failures"), list))


def measure(model: Any, tokenizer: Any, sets: ProbeSets, *, block: int, precision: str,
            known: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model's answers: knowledge per set (with each answer), chat ppl and format health.

    `known`: this same model's answers on the fixed sets from an earlier measurement (see
    `reusable`); with a matching fingerprint they are taken instead of generated again.
    """
    t0 = time.time()
    if not _valid_known(known) or known.get("fingerprint") != fingerprint(sets, precision):
        known = None
    report: dict[str, Any] = {"knowledge": {}, "answers": {}}
    names = ("learned", "held_out") if known else ("learned", "held_out", "general")
    rows = probe.ask(model, tokenizer, [q for n in names for q in getattr(sets, n)],
                        max_new_tokens=PROBE_NEW_TOKENS)
    i = 0
    for name in names:
        n = len(getattr(sets, name))
        report["answers"][name], i = rows[i:i + n], i + n
    if known:
        report["answers"]["general"] = known["general"]
        report.update({k: known[k] for k in FIXED_PARTS})
    else:
        report["chat_ppl"] = probe.perplexity_of_references(model, tokenizer, sets.retention, block=block,
                                                            precision=precision)
        report["format_ok"], report["format_failures"] = probe.format_check(model, tokenizer, sets.retention,
                                                                            max_new_tokens=CHAT_NEW_TOKENS)
    for name, part in report["answers"].items():
        report["knowledge"][name] = sum(r["score"] for r in part) / len(part) if part else None
    report["reused"] = bool(known)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[ProbeMetrics, dict[str, Any]]:
    """-> (metrics for the gate and the dashboard, what the manifest keeps for people to read)."""
    def pair(a, b) -> Pair:
        return Pair(before=None if a is None else round(a, 4), after=None if b is None else round(b, 4))

    retention = probe.retention(before["chat_ppl"], after["chat_ppl"])
    metrics = ProbeMetrics(
        knowledge=KnowledgeMetrics(
            **{k: pair(before["knowledge"].get(k), after["knowledge"].get(k))
               for k in ("learned", "held_out", "general") if after["knowledge"].get(k) is not None},
            asked={k: len(after["answers"].get(k) or []) for k in ("learned", "held_out", "general")}),
        chat=ChatMetrics(ppl=pair(before["chat_ppl"], after["chat_ppl"]),
                         retention=None if retention is None else round(retention, 4),
                         format_ok=pair(before["format_ok"], after["format_ok"])),
        probe_seconds=round(before.get("seconds", 0) + after.get("seconds", 0), 1),
        parent_probe_reused=bool(before.get("reused")))
    examples = []
    for b, a in zip(before["answers"].get("learned", []), after["answers"].get("learned", [])):
        examples.append({"question": a["question"], "parent": b["answer"], "candidate": a["answer"],
                         "parent_score": b["score"], "candidate_score": a["score"]})
    examples.sort(key=lambda e: e["candidate_score"] - e["parent_score"], reverse=True)
    shown = {"examples": examples[:EXAMPLES_SHOWN], "reusable": after.get("reusable"),
             "answers": {"parent": before["answers"], "candidate": after["answers"]},
             "format_failures": {"parent": before["format_failures"], "candidate": after["format_failures"]}}
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
