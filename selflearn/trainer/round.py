"""One training round end to end: fetch, clean, split, evaluate, train, evaluate, publish.

    sources -> pipeline -> pack -> ppl(parent) -> fine-tune -> ppl(new) -> publish (manifest last)

The round trains from `parent` (the served checkpoint), or the base model on round 1, and
measures both weights on three sets: fresh held-out articles, the trained articles, and the
fixed general set. The promotion decision is not made here: the driver (local or operator)
applies selflearn.policy to the metrics this round publishes.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import basemodel
from ..checkpoints import CheckpointRef, CheckpointStore
from ..sources.base import Article
from ..sources.factory import build_sources, general_language
from ..sources.pipeline import DEFAULT_BLOCKLIST, BlocklistFilter, clean_articles
from ..sources.snapshot import general_set
from ..spec import RunConfig
from ..sources import feedback as feedback_source
from . import data, feedback_learning, knowledge, loop, preference, precision as prec
from .model_io import load_for_training, save_for_checkpoint

log = logging.getLogger("selflearn.trainer")

STATE_KEY = "state.json"
ARTICLES_FILE = "articles.jsonl"
BASE_PROBE_KEY = "base_probe.json"


@dataclass
class RoundResult:
    status: str  # published | empty
    round: int
    checkpoint: str | None = None
    id: str | None = None
    parent: str | None = None
    metrics: dict[str, Any] | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def open_store(config: RunConfig) -> CheckpointStore:
    import os

    st = config.spec.storage
    return CheckpointStore.from_uri(st.uri, endpoint=st.endpoint or os.environ.get("S3_ENDPOINT"),
                                    region=st.region)


def preflight(config: RunConfig, store: CheckpointStore) -> Any:
    """Everything that can be wrong with a run, checked before any article is fetched."""
    spec = config.spec
    model_cfg = basemodel.load_config(spec.base_model)
    ctx = basemodel.context_length(model_cfg)
    if spec.training.max_length > ctx:
        raise ValueError(f"training.maxLength {spec.training.max_length} exceeds {spec.base_model}'s context of {ctx}")
    prec.resolve(spec.training.precision, prec.pick_device())
    store.check()
    return model_cfg


def resolve_parent(store: CheckpointStore, run: str, parent: str | None) -> CheckpointRef | None:
    """`base` -> the base model; a URI -> that checkpoint; None -> promoted, else newest complete."""
    if parent == "base":
        return None
    if parent:
        src, prun, pround = CheckpointStore.for_checkpoint(parent)
        return src.ref(prun, pround) if src.uri == store.uri else CheckpointRef(prun, pround, parent)
    return store.promoted(run) or store.latest(run)


def _earlier_articles(store: CheckpointStore, run: str, limit: int) -> list[dict[str, Any]]:
    """Texts of articles learned in earlier rounds, newest first (for replay)."""
    out: list[dict[str, Any]] = []
    for ref in reversed(store.list(run)):
        raw = store.backend.get_bytes(f"{run}/r{ref.round:06d}/{ARTICLES_FILE}")
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


def _learned_before(store: CheckpointStore, run: str, parent: CheckpointRef | None) -> _Learned:
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


def _parent_probe(store: CheckpointStore, run: str, parent: CheckpointRef | None) -> dict[str, Any] | None:
    """The parent weights' answers on the fixed probe sets, measured when they were a candidate
    (or, for the base model, in an earlier round of this run)."""
    if parent is None:
        return store.get_json(f"{run}/{BASE_PROBE_KEY}")
    try:
        return ((store.manifest(parent).get("probe") or {}).get("reusable")) or None
    except Exception:  # another store, an old manifest: measure afresh
        return None


def _training_batches(config: RunConfig, round_: int, tok: Any, train_arts: list[Article],
                      train_docs: list[list[int]], replay_docs: list[list[int]], refs: dict[str, list[dict]] | None,
                      earlier: list[dict[str, Any]], fb: "preference.FeedbackData | None" = None,
                      ) -> tuple[list, "knowledge.ChatData | None", int]:
    """The round's training batches in its `training.format`; -> (batches, chat data, examples too long).

    text: the articles (and replayed earlier articles) packed as plain LM blocks. chat/mixed: the
    question/answer pairs, earlier rounds' first questions and replayed chat answers, packed with
    the raw text (mixed) or only with the text of articles that yielded no pair (chat). Users'
    corrections come as text here, in every format; as chat examples they get a pass of their own
    (`feedback_learning.correction_batches`).
    """
    spec = config.spec
    L, B, eos = spec.training.max_length, spec.training.batch_size, tok.eos_token_id
    fb_docs = data.tokenize(tok, fb.texts) if fb and fb.texts else []
    if spec.training.format == "text":
        return data.batches(data.pack(train_docs + replay_docs + fb_docs, L, eos, fill_tail=True), B), None, 0
    # `earlier` is shuffled for this round: its first articles are the ones asked about again.
    review = [Article(title=a["title"], text=a["text"], source=a.get("source") or "snapshot:en",
                      extra=a.get("extra") or {}) for a in earlier[:spec.training.qa_review]]
    chat = knowledge.build_chat_data(
        tok, train_arts, per_article=spec.training.qa_pairs_per_article, round_=round_,
        replay=refs["replay"] if refs else [], replay_n=spec.training.chat_replay,
        generator=knowledge.load_generator(spec.training.pair_generator), review=review)
    text = train_docs + replay_docs if spec.training.format == "mixed" else \
        [d for a, d in zip(train_arts, train_docs) if a.title in chat.text_only]
    too_long = sum(1 for ids, _ in chat.examples if len(ids) > L)
    if too_long:
        log.warning("%d of %d chat examples are longer than training.maxLength %d and are not trained",
                    too_long, len(chat.examples), L)
    return data.batches(data.pack_examples(chat.examples, text + fb_docs, L, eos), B), chat, too_long


def _probe_parent(store: CheckpointStore, run: str, parent: CheckpointRef | None, model: Any, tok: Any,
                  probes: knowledge.ProbeSets, block: int, precision: str) -> dict[str, Any]:
    """The parent's answers, reusing what is known of it on the fixed sets; the base model's are
    kept in the store for the run's later rounds that start from it again."""
    report = knowledge.measure(model, tok, probes, block=block, precision=precision,
                               known=_parent_probe(store, run, parent))
    if parent is None and not report["reused"]:
        store.put_json(f"{run}/{BASE_PROBE_KEY}", knowledge.reusable(report, knowledge.fingerprint(probes, precision)))
    return report


def _probe_candidate(model: Any, tok: Any, probes: knowledge.ProbeSets, before: dict[str, Any], block: int,
                     precision: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (the metrics the gate reads, what the manifest shows): the candidate against its parent."""
    after = knowledge.measure(model, tok, probes, block=block, precision=precision)
    after["reusable"] = knowledge.reusable(after, knowledge.fingerprint(probes, precision))
    metrics, shown = knowledge.compare(before, after)
    log.info(knowledge.summary_line(metrics))
    return metrics, shown


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


def run_round(
    config: RunConfig,
    round_: int,
    *,
    parent: str | None = None,
    store: CheckpointStore | None = None,
    workdir: Path | None = None,
    sources: list | None = None,
    on_step: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> RoundResult:
    if round_ < 1:
        raise ValueError(f"round must be >= 1, got {round_}")
    spec, run, t_start = config.spec, config.name, time.time()
    store = store or open_store(config)
    preflight(config, store)
    if store.list(run) and any(r.round == round_ for r in store.list(run)):
        raise ValueError(f"round {round_} of run {run!r} is already published at {store.ref(run, round_).uri}")
    parent_ref = resolve_parent(store, run, parent)
    state = store.get_json(f"{run}/{STATE_KEY}") or {}

    learned = _learned_before(store, run, parent_ref)
    train_arts, held, dropped, cursors = collect_articles(config, state.get("cursors", {}), learned.articles, sources)
    for title, why in dropped:
        log.info(json.dumps({"event": "dropped", "title": title, "reason": why}))
    fb_round = None
    if spec.feedback is not None:
        import os

        fb_round = feedback_source.collect(
            spec.feedback, store, run, cursors.get("feedback") or {}, learned_before=learned.feedback,
            retry=learned.retry, blocklist=spec.training.blocklist,
            endpoint=spec.storage.endpoint or os.environ.get("S3_ENDPOINT"), region=spec.storage.region)
        if fb_round.cursor is not None:
            cursors["feedback"] = fb_round.cursor
    if not train_arts and not (fb_round and fb_round.learned):
        store.put_json(f"{run}/{STATE_KEY}", {**state, "cursors": cursors, "last_round": round_})
        reason = f"empty round: all {len(dropped)} fetched articles were filtered out" if dropped else \
            "empty round: the sources returned no new articles"
        log.warning(reason)
        return RoundResult("empty", round_, reason=reason)

    marks: list[tuple[str, float]] = [("loading", time.monotonic())]

    def phase(name: str) -> None:
        marks.append((name, time.monotonic()))
        if on_step:
            on_step({"event": "phase", "phase": name})

    def phase_seconds() -> dict[str, float]:
        """Where the round's time went so far: seconds per phase."""
        ends = [t for _, t in marks[1:]] + [time.monotonic()]
        return {name: round(end - t, 1) for (name, t), end in zip(marks, ends)}

    device = prec.pick_device()
    precision = prec.resolve(spec.training.precision, device)
    torch.manual_seed(spec.training.seed + round_)
    with tempfile.TemporaryDirectory(prefix="selflearn-round-", dir=workdir) as tmp:
        tmp = Path(tmp)
        model, tok = load_for_training(spec, parent_ref, store, tmp / "parent", device)
        # CPU bf16: the model runs in bf16 while exact fp32 masters take the updates.
        master = loop.MasterWeights.for_cpu_bf16(model) if device.type == "cpu" and precision == "bf16" else None
        eos = tok.eos_token_id
        L, B = spec.training.max_length, spec.training.batch_size

        def batches_of(docs: list[list[int]], train: bool = False) -> list[torch.Tensor]:
            return data.batches(data.pack(docs, L, eos, fill_tail=train), B)

        def tokens_of(texts: list[str]) -> list[list[int]]:
            return data.tokenize(tok, texts)

        general = general_set(general_language(spec), spec.training.general_articles)
        # Tokenised once: packed full for training, with its exact tail for the "trained" eval set.
        train_docs = tokens_of([a.text for a in train_arts])
        replay_docs: list[list[int]] = []
        wants_review = spec.training.format != "text" and spec.training.qa_review > 0
        # Earlier rounds' articles, read once, shuffled per round: for text replay and for review.
        earlier = _earlier_articles(store, run, 10_000) if spec.training.replay_fraction > 0 or wants_review else []
        random.Random(spec.training.seed + round_).shuffle(earlier)
        if spec.training.replay_fraction > 0:
            # Replay earlier rounds' articles so this round's blocks are `replay_fraction` old text.
            want = int(len(train_arts) * spec.training.replay_fraction / (1 - spec.training.replay_fraction))
            replay_docs = tokens_of([a["text"] for a in earlier[:want]])
        refs = knowledge.references(spec.base_model, store, run, model, tok,
                                    recorded_from=parent_ref.uri if parent_ref else "base") \
            if spec.training.chat_eval or (spec.training.format != "text" and spec.training.chat_replay) else None
        fb_data = preference.build(tok, fb_round.corrections, fb_round.ratings, repeats=spec.feedback.repeats) \
            if fb_round and fb_round.learned else None
        train_batches, chat, too_long = _training_batches(config, round_, tok, train_arts, train_docs, replay_docs,
                                                          refs, earlier, fb_data)
        sets = {"fresh": batches_of(tokens_of([a.text for a in held])), "trained": batches_of(train_docs),
                "general": batches_of(tokens_of([a.text for a in general]))}
        phase("evaluating the parent")
        ppl_before = {k: loop.perplexity(model, v, precision) for k, v in sets.items()}
        probes = knowledge.ProbeSets.of(train_arts, held, general, refs["retention"]) if spec.training.chat_eval \
            else None
        report_before = _probe_parent(store, run, parent_ref, model, tok, probes, L, precision) if probes else None
        prefer = fb_data is not None and spec.feedback.preference != "off" and bool(fb_data.pairs or fb_data.judged)
        fb_refs = preference.references(model, tok, fb_data, precision, train=prefer) if fb_data else None
        cfg = loop.LoopConfig(epochs=spec.training.epochs, gradient_accumulation=spec.training.gradient_accumulation,
                              learning_rate=spec.training.learning_rate, weight_decay=spec.training.weight_decay,
                              warmup_ratio=spec.training.warmup_ratio, precision=precision,
                              seed=spec.training.seed + round_, compile=spec.training.compile)
        phase("training")
        stats = loop.train(model, train_batches, cfg, master=master, on_step=on_step, progress=progress)
        fb_stats = feedback_learning.learn(model, tok, config, round_, fb_data, fb_refs, cfg, chat=chat, refs=refs,
                                           text=train_docs, master=master, on_step=on_step, progress=progress,
                                           phase=phase, prefer=prefer) if fb_data else {}
        phase("evaluating the candidate")
        ppl_after = {k: loop.perplexity(model, v, precision) for k, v in sets.items()}
        chat_metrics, shown = ({}, None) if not probes else \
            _probe_candidate(model, tok, probes, report_before, L, precision)
        fb_metrics = feedback_learning.metrics(fb_round, fb_data, fb_refs, fb_stats, model, tok, precision) \
            if fb_round is not None else None

        out = tmp / "checkpoint"
        if master:
            master.restore_fp32(model)
        save_for_checkpoint(model, tok, spec, out)
        with open(out / ARTICLES_FILE, "w") as f:
            for a in train_arts:
                # source and extra (topic, description): a later round rebuilds the same questions.
                f.write(json.dumps({"title": a.title, "sha256": a.sha256, "text": a.text, "source": a.source,
                                    "extra": a.extra}, default=str) + "\n")
        metrics = {
            "train_loss": stats.final_loss,
            "losses": [round(x, 4) for x in stats.losses],
            "train_tokens": stats.tokens,
            "train_seconds": round(stats.seconds, 2),
            "tokens_per_s": round(stats.tokens_per_s, 1),
            "steps": stats.steps,
            "ppl": {k: {"before": ppl_before[k], "after": ppl_after[k]} for k in sets if ppl_before[k] is not None},
            "articles": len(train_arts),
            "held_out": len(held),
            "replayed": len(replay_docs),
            "dropped": len(dropped),
            "format": spec.training.format,
            **({"qa_pairs": len(chat.pairs), "chat_replayed": chat.replayed, "qa_reviewed": chat.reviewed,
                "text_only": len(chat.text_only),
                "examples_too_long": too_long}
               if chat else {}),
            **chat_metrics,
            **({"feedback": fb_metrics} if fb_metrics is not None else {}),
            "phase_seconds": phase_seconds(),
        }
        manifest = {
            "base_model": spec.base_model,
            "parent": parent_ref.uri if parent_ref else None,
            "method": spec.training.method,
            "adapter": spec.training.method == "lora" and not spec.training.lora.merge,
            "precision": precision,
            "device": device.type,
            "hyperparameters": spec.training.model_dump(by_alias=True, mode="json"),
            "metrics": metrics,
            "articles": [a.provenance() for a in train_arts],
            "held_out_articles": [a.provenance() for a in held],
            "dropped_articles": [{"title": t, "reason": r} for t, r in dropped],
            **({"qa_pairs": [{"title": p.title, "kind": p.kind, "question": p.question} for p in chat.pairs]}
               if chat else {}),
            **({"probe": shown} if shown else {}),
            **({"feedback": fb_round.traces(),
                "feedback_dropped": [{"id": i, "reason": r} for i, r in fb_round.dropped]} if fb_round else {}),
            "cursors": cursors,
            "software": {"torch": torch.__version__, "python": platform.python_version()},
            "started_at": t_start,
        }
        phase("publishing")
        ref = store.publish(run, round_, out, manifest)
    store.put_json(f"{run}/{STATE_KEY}", {**state, "cursors": cursors, "last_round": round_})
    store.retain(run, spec.storage.keep_checkpoints, protect=[parent_ref.uri] if parent_ref else [])
    log.info(json.dumps({"event": "published", "checkpoint": ref.uri, "seconds": round(time.time() - t_start, 1)}))
    summary = {k: v for k, v in metrics.items() if k != "losses"}
    return RoundResult("published", round_, ref.uri, ref.id, parent_ref.uri if parent_ref else None, summary)
