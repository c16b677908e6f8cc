"""What a round starts from: the articles to learn and hold out, the users' feedback, and what
earlier rounds of the run already learned (so nothing is trained twice).

Reads the sources and the store; decides nothing about training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ..checkpoints import CheckpointRef, CheckpointStore
from ..sources import feedback as feedback_source
from ..sources.base import Article
from ..sources.factory import build_sources
from ..sources.pipeline import DEFAULT_BLOCKLIST, BlocklistFilter, clean_articles
from ..spec import RunConfig

log = logging.getLogger("selflearn.trainer")

STATE_KEY = "state.json"  # <run>/state.json: the sources' cursors and the last round
ARTICLES_FILE = "articles.jsonl"  # beside each checkpoint: the articles it learned, in full


@dataclass
class RoundInputs:
    state: dict[str, Any]  # the run's state document as the round found it
    train: list[Article]
    held: list[Article]  # fetched on top, never trained on: the fresh evaluation set
    dropped: list[tuple[str, str]]  # (title, why) of the articles the pipeline filtered out
    cursors: dict[str, Any]  # where each source continues next round
    feedback: "feedback_source.FeedbackRound | None"


def earlier_articles(store: CheckpointStore, run: str, limit: int) -> list[dict[str, Any]]:
    """Texts of articles learned in earlier rounds, newest first (for replay)."""
    out: list[dict[str, Any]] = []
    for ref in reversed(store.list(run)):
        raw = store.checkpoint_file(ref, ARTICLES_FILE)
        if raw:
            out += [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if len(out) >= limit:
            break
    return out[:limit]


@dataclass
class _Learned:
    """What earlier rounds of the run learned."""

    articles: set[str]  # sha256 of every article any round trained on
    feedback: set[str]  # digests of the feedback the parent's line of checkpoints learned
    # Feedback keys learned only by candidates that were not promoted: (key, times tried).
    retry: dict[str, int]


def learned_before(store: CheckpointStore, run: str, parent: CheckpointRef | None) -> _Learned:
    manifests = {ref.uri: store.manifest(ref) for ref in store.list(run)}
    articles = {a["sha256"] for m in manifests.values() for a in m.get("articles", []) if a.get("sha256")}
    line: set[str] = set()
    uri = parent.uri if parent else None
    while uri and uri in manifests and uri not in line:
        line.add(uri)
        uri = manifests[uri].get("parent")
    feedback = {f["sha256"] for u in line for f in manifests[u].get("feedback", []) if f.get("sha256")}
    # A rejected candidate's feedback was read but never reached the served model: it is offered
    # again, once (twice rejected, it is not tried again).
    retry: dict[str, int] = {}
    for u, m in manifests.items():
        if u not in line:
            for f in m.get("feedback", []):
                if f.get("key") and f.get("sha256") not in feedback:
                    retry[f["key"]] = retry.get(f["key"], 0) + 1
    return _Learned(articles, feedback, retry)


def collect_articles(config: RunConfig, cursors: dict[str, Any], seen: set[str],
                     sources: list | None = None) -> tuple[list[Article], list[Article], list, dict]:
    """-> (train, held_out, dropped, new_cursors). Held-out articles come from the first
    Wikipedia/snapshot source, fetched on top of its articlesPerRound, and are never trained on."""
    spec = config.spec
    sources = sources if sources is not None else build_sources(spec)
    new_cursors = dict(cursors)
    train: list[Article] = []
    held: list[Article] = []
    dropped: list = []
    filters = [BlocklistFilter(list(DEFAULT_BLOCKLIST) + list(spec.training.blocklist))]
    eval_left = spec.training.eval_articles
    for src_spec, src in zip(spec.article_sources, sources):
        n = getattr(src_spec.wikipedia or src_spec.snapshot, "articles_per_round", 10_000)
        extra = eval_left if src_spec.kind in ("wikipedia", "snapshot") else 0
        fetched, new_cursors[src.name] = src.fetch(n + extra, cursors.get(src.name, {}))
        res = clean_articles(fetched, min_chars=spec.training.min_chars, filters=filters, seen_sha256=seen)
        seen |= {a.sha256 for a in res.kept}
        dropped += res.dropped
        if extra and len(res.kept) > extra:
            held += res.kept[-extra:]
            res.kept = res.kept[:-extra]
            eval_left = 0
        train += res.kept
    return train, held, dropped, new_cursors


def gather(config: RunConfig, store: CheckpointStore, parent: CheckpointRef | None,
           sources: list | None = None) -> RoundInputs:
    """The round's articles and feedback, new to the run's line of checkpoints."""
    spec, run = config.spec, config.name
    state = store.get_json(f"{run}/{STATE_KEY}") or {}
    learned = learned_before(store, run, parent)
    train, held, dropped, cursors = collect_articles(config, state.get("cursors", {}), learned.articles, sources)
    for title, why in dropped:
        log.info(json.dumps({"event": "dropped", "title": title, "reason": why}))
    fb_round = None
    if spec.feedback is not None:
        fb_round = feedback_source.collect(
            spec.feedback, store, run, cursors.get("feedback") or {},
            history=feedback_source.FeedbackHistory(learned.feedback, learned.retry), blocklist=spec.training.blocklist,
            storage=spec.storage)
        if fb_round.cursor is not None:
            cursors["feedback"] = fb_round.cursor
    return RoundInputs(state, train, held, dropped, cursors, fb_round)
