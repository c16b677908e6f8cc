"""One training round end to end: fetch, clean, split, evaluate, train, evaluate, publish.

    sources -> pipeline -> pack -> ppl(parent) -> fine-tune -> ppl(new) -> publish (manifest last)

The round trains from `parent` (the served checkpoint), or the base model on round 1, and
measures both weights on three sets: fresh held-out articles, the trained articles, and the
fixed general set. The promotion decision is not made here: the driver (local or operator)
applies selflearn.policy to the metrics this round publishes.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from .. import basemodel
from ..checkpoints import CheckpointRef, CheckpointStore
from ..contracts import RoundResult, checkpoint_id
from ..memory import Memory
from ..sources.base import Article, Source
from ..sources.factory import general_language
from ..sources.snapshot import general_set
from ..spec import RunConfig
from .. import precision as prec
from . import data, distributed, feedback_learning, knowledge, loop, preference, publishing
from .context import Listener, Phases, Prepared, RoundContext
from .data import Block
from .distributed import World
from .inputs import earlier_articles, gather
from .model_io import load_for_training, reload_for_training
from .publishing import Measured
from .qa import make_pairs
from .reading import MIN_READING_TOKENS, Reading
from .renderings import renderings

log = logging.getLogger("selflearn.trainer")

BASE_PROBE_KEY = "base_probe.json"


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


def _parent_probe(store: CheckpointStore, run: str, parent: CheckpointRef | None) -> knowledge.KnownProbe | None:
    """The parent weights' answers on the fixed probe sets, measured when they were a candidate
    (or, for the base model, in an earlier round of this run); None: measure them afresh."""
    if parent is None:
        return knowledge.KnownProbe.parse(store.get_json(f"{run}/{BASE_PROBE_KEY}"))
    try:
        return knowledge.KnownProbe.parse((store.manifest(parent).get("probe") or {}).get("reusable"))
    except Exception:  # another store, an old manifest: measure afresh
        return None


def _training_batches(ctx: RoundContext, train_docs: list[list[int]], replay_docs: list[list[int]],
                      refs: knowledge.ChatReferences | None, earlier: list[dict[str, Any]],
                      fb: preference.FeedbackData | None) -> tuple[list[Block], knowledge.ChatData | None, int]:
    """The round's training batches in its `training.format`; -> (batches, chat data, examples too long).

    text: the articles (and replayed earlier articles) packed as plain LM blocks. chat/mixed: the
    question/answer pairs, earlier rounds' first questions and replayed chat answers, packed with
    the raw text (mixed) or only with the text of articles that yielded no pair (chat). Users'
    corrections come as text here, in every format; as chat examples they get a pass of their own
    (`feedback_learning.correction_batches`).
    """
    t, tok, train_arts = ctx.training, ctx.tokenizer, ctx.inputs.train
    L, B, eos = t.max_length, t.batch_size, ctx.eos
    fb_docs = data.tokenize(tok, fb.texts) if fb and fb.texts else []
    if t.format == "text":
        return data.batches(data.pack(train_docs + replay_docs + fb_docs, L, eos, fill_tail=True), B), None, 0
    # `earlier` is shuffled for this round: its first articles are the ones asked about again.
    review = [Article(title=a["title"], text=a["text"], source=a.get("source") or "snapshot:en",
                      extra=a.get("extra") or {}) for a in earlier[:t.qa_review]]
    chat = knowledge.build_chat_data(
        tok, train_arts, per_article=t.qa_pairs_per_article, review=review,
        replay=knowledge.Replay(refs.replay if refs else [], t.chat_replay, ctx.round),
        # qaNamed: the built-in pairs plus the one from the fact back to the subject, through the
        # same hook a pairGenerator plugs into.
        generator=knowledge.load_generator(t.pair_generator) or
        (partial(make_pairs, per_article=t.qa_pairs_per_article, named=True) if t.qa_named else None),
        reading=Reading(t.qa_reading, L, t.seed + ctx.round)
        if t.qa_reading > 0 and L >= MIN_READING_TOKENS else None)
    text = train_docs + replay_docs if t.format == "mixed" else \
        [d for a, d in zip(train_arts, train_docs) if a.title in chat.text_only]
    if t.renderings:  # of the articles whose text this format trains
        texted = [a for a in train_arts if t.format == "mixed" or a.title in chat.text_only]
        text = text + data.tokenize(tok, renderings(texted, t.renderings))
    too_long = sum(1 for ids, _ in chat.examples if len(ids) > L)
    if too_long:
        log.warning("%d of %d chat examples are longer than training.maxLength %d and are not trained",
                    too_long, len(chat.examples), L)
    return data.batches(data.pack_examples(chat.examples, text + fb_docs, L, eos), B), chat, too_long


def _probe_parent(ctx: RoundContext, probes: knowledge.ProbeSets, world: World) -> knowledge.ProbeReport:
    """The parent's answers, reusing what is known of it on the fixed sets; the base model's are
    kept in the store for the run's later rounds that start from it again (by rank 0)."""
    known = distributed.from_leader(world, lambda: _parent_probe(ctx.store, ctx.run, ctx.parent))
    report = knowledge.measure(ctx.model, ctx.tokenizer, probes, block=ctx.training.max_length,
                               precision=ctx.precision, known=known, memory=ctx.parent_memory, world=world)
    if ctx.parent is None and not report.reused and world.leader:
        ctx.store.put_json(f"{ctx.run}/{BASE_PROBE_KEY}", report.reusable())
    return report


def _probe_candidate(ctx: RoundContext, prep: Prepared, before: knowledge.ProbeReport,
                     world: World) -> tuple[knowledge.ProbeMetrics, dict[str, Any]]:
    """-> (the metrics the gate reads, what the manifest shows): the candidate against its parent."""
    assert prep.probes is not None
    after = knowledge.measure(ctx.model, ctx.tokenizer, prep.probes, block=ctx.training.max_length,
                              precision=ctx.precision, memory=prep.memory, world=world)
    metrics, shown = knowledge.compare(before, after)
    if world.leader:
        log.info(knowledge.summary_line(metrics))
    return metrics, shown


def _prepare(ctx: RoundContext) -> Prepared:
    """Everything the round builds from its inputs before it measures the parent."""
    spec, run, t, tok, inputs = ctx.spec, ctx.run, ctx.training, ctx.tokenizer, ctx.inputs
    L, B, eos = t.max_length, t.batch_size, ctx.eos

    def batches_of(docs: list[list[int]]) -> list[Block]:
        return data.batches(data.pack(docs, L, eos, fill_tail=False), B)

    general = general_set(general_language(spec), t.general_articles)
    # Tokenised once: packed full for training, with its exact tail for the "trained" eval set.
    train_docs = data.tokenize(tok, [a.text for a in inputs.train])
    replay_docs: list[list[int]] = []
    wants_review = t.format != "text" and t.qa_review > 0
    # Earlier rounds' articles, read once, shuffled per round: for text replay and for review.
    earlier = earlier_articles(ctx.store, run, 10_000) if t.replay_fraction > 0 or wants_review else []
    random.Random(t.seed + ctx.round).shuffle(earlier)
    if t.replay_fraction > 0:
        # Replay earlier rounds' articles so this round's blocks are `replay_fraction` old text.
        want = int(len(inputs.train) * t.replay_fraction / (1 - t.replay_fraction))
        replay_docs = data.tokenize(tok, [a["text"] for a in earlier[:want]])
    refs = knowledge.references(spec.base_model, ctx.store, run, ctx.model, tok,
                                recorded_from=ctx.parent.uri if ctx.parent else "base") \
        if t.chat_eval or (t.format != "text" and t.chat_replay) else None
    fb = inputs.feedback
    fb_data = preference.build(tok, fb.corrections, fb.ratings, repeats=ctx.feedback_spec.repeats) \
        if fb and fb.learned else None
    train_batches, chat, too_long = _training_batches(ctx, train_docs, replay_docs, refs, earlier, fb_data)
    sets = {"fresh": batches_of(data.tokenize(tok, [a.text for a in inputs.held])),
            "trained": batches_of(train_docs),
            "general": batches_of(data.tokenize(tok, [a.text for a in general]))}
    probes = knowledge.ProbeSets.of(inputs.train, inputs.held, general, refs.retention,
                                    memory_use=spec.serving.memory) \
        if t.chat_eval and refs else None
    return Prepared(train_docs, replay_docs, train_batches, chat, too_long, sets, refs, probes, fb_data,
                    _grown_memory(ctx))


def _train_and_measure(ctx: RoundContext, prep: Prepared, world: World,
                       reload: "Callable[[], torch.nn.Module]") -> tuple[Measured, RoundContext]:
    """Measure the parent, train, measure the candidate: the same sets, probes and precision.

    With several ranks the perplexities are sharded and summed, training is shared (loop.train),
    and the probes' answers are generated a share of whole batches each and gathered. -> (measures, the context whose
    model is the trained one: under FSDP a whole copy gathered from the shards, via `reload`)."""
    t, precision = ctx.training, ctx.precision
    ctx.phases("evaluating the parent")
    ppl_before = {k: loop.perplexity(ctx.model, v, precision, world) for k, v in prep.sets.items()}
    report_before = _probe_parent(ctx, prep.probes, world) if prep.probes else None
    fb_data = prep.fb_data
    prefer = fb_data is not None and ctx.feedback_spec.preference != "off" and bool(fb_data.pairs or fb_data.judged)
    fb_refs = preference.references(ctx.model, ctx.tokenizer, fb_data, precision, train=prefer) if fb_data else None
    cfg = loop.LoopConfig(epochs=t.epochs, gradient_accumulation=t.gradient_accumulation,
                          learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio,
                          precision=precision, seed=t.seed + ctx.round, compile=t.compile)
    ctx.phases("training")
    stats = loop.train(ctx.model, prep.train_batches, cfg, master=ctx.master, on_step=ctx.on_step, world=world)
    if world.strategy == "fsdp":  # the shards, whole again in a plain model for what follows
        ctx = _gathered(ctx, distributed.full_state_dict(ctx.model), reload)
    # Corrections and preferences (small) run whole on every rank: the same data, the same weights.
    fb_stats = feedback_learning.learn(ctx, prep, fb_data, fb_refs, cfg, prefer=prefer) \
        if fb_data is not None and fb_refs is not None else feedback_learning.FeedbackStats()
    ctx.phases("evaluating the candidate")
    ppl_after = {k: loop.perplexity(ctx.model, v, precision, world) for k, v in prep.sets.items()}
    probed, shown = _probe_candidate(ctx, prep, report_before, world) \
        if prep.probes and report_before is not None else (None, None)
    fb_metrics = feedback_learning.metrics(ctx, fb_data, fb_refs, fb_stats)
    return Measured(stats, ppl_before, ppl_after, probed, shown, fb_metrics), ctx


def _gathered(ctx: RoundContext, state: dict[str, torch.Tensor], reload: "Callable[[], torch.nn.Module]") -> RoundContext:
    """A plain model holding FSDP's trained weights (fp32), run as the round runs its model."""
    model = reload()
    model.load_state_dict(state)
    master = loop.MasterWeights.for_cpu_bf16(model) if ctx.master is not None else None
    model.eval()
    return replace(ctx, model=model, master=master)


def _grown_memory(ctx: RoundContext) -> Memory | None:
    """The candidate's memory: its parent's passages and this round's articles (training.memory)."""
    if not ctx.training.memory:
        return None
    parent = ctx.parent_memory or Memory.build([], general_language(ctx.spec))
    return parent.grown(ctx.inputs.train, checkpoint_id(ctx.run, ctx.round))


def run_round(
    config: RunConfig,
    round_: int,
    *,
    parent: str | None = None,
    store: CheckpointStore | None = None,
    workdir: Path | None = None,
    sources: list[Source] | None = None,
    on_step: Listener | None = None,
) -> RoundResult:
    """Train, measure and publish round `round_` of `config`'s run from `parent` (see
    `resolve_parent`); `on_step` hears each phase as it starts and each training step.

    Under torchrun every rank calls this (distributed.py): rank 0 reads the store and gathers
    the inputs, all train, rank 0 publishes, and every rank returns the round's result."""
    if round_ < 1:
        raise ValueError(f"round must be >= 1, got {round_}")
    device = prec.pick_device()
    world = distributed.join(device, config.spec.trainer.active_deadline_seconds)
    try:
        return _run_round(config, round_, world, device, parent=parent, store=store, workdir=workdir,
                          sources=sources, on_step=on_step)
    finally:
        distributed.leave(world)


def _start(config: RunConfig, round_: int, store: CheckpointStore, parent: str | None,
           sources: list[Source] | None) -> tuple[CheckpointRef | None, Any] | RoundResult:
    """What rank 0 does before any weights load: check the run, pick the parent, gather the
    inputs; -> (parent, inputs), or the result of a round with nothing to learn."""
    run = config.name
    preflight(config, store)
    if store.list(run) and any(r.round == round_ for r in store.list(run)):
        raise ValueError(f"round {round_} of run {run!r} is already published at {store.ref(run, round_).uri}")
    parent_ref = resolve_parent(store, run, parent)
    inputs = gather(config, store, parent_ref, sources)
    if not inputs.train and not (inputs.feedback and inputs.feedback.learned):
        publishing.record_cursors(store, run, inputs, round_)
        reason = f"empty round: all {len(inputs.dropped)} fetched articles were filtered out" if inputs.dropped \
            else "empty round: the sources returned no new articles"
        log.warning(reason)
        return RoundResult("empty", round_, reason=reason)
    return parent_ref, inputs


def _run_round(config: RunConfig, round_: int, world: World, device: torch.device, *, parent: str | None,
               store: CheckpointStore | None, workdir: Path | None, sources: list[Source] | None,
               on_step: Listener | None) -> RoundResult:
    spec, t_start = config.spec, time.time()
    store = store or open_store(config)
    started = distributed.from_leader(world, lambda: _start(config, round_, store, parent, sources))
    if isinstance(started, RoundResult):
        return started
    parent_ref, inputs = started

    phases = Phases(on_step)
    precision = prec.resolve(spec.training.precision, device)
    torch.manual_seed(spec.training.seed + round_)
    with tempfile.TemporaryDirectory(prefix="selflearn-round-", dir=workdir) as tmp_dir:
        tmp = Path(tmp_dir)
        model, tok = load_for_training(spec, parent_ref, store, tmp / "parent", device)
        world = distributed.with_strategy(world, spec.trainer.strategy, model, device)
        # CPU bf16: the model runs in bf16 while exact fp32 masters take the updates.
        master = loop.MasterWeights.for_cpu_bf16(model) if device.type == "cpu" and precision == "bf16" else None
        ctx = RoundContext(config, round_, store, parent_ref, inputs, model, tok, device, precision, master, phases,
                           started_at=t_start, parent_memory=Memory.load(tmp / "parent") if parent_ref else None)
        built: list[Prepared] = []

        def prepare() -> Prepared:  # rank 0 builds; the others rebuild the memory (an index) themselves
            built.append(_prepare(ctx))
            return replace(built[0], memory=None)

        shared = distributed.from_leader(world, prepare)
        prep = built[0] if built else replace(shared, memory=_grown_memory(ctx))
        measured, ctx = _train_and_measure(ctx, prep, world, partial(reload_for_training, spec, parent_ref,
                                                                     tmp / "parent", device))

        # Rank 0 alone writes to the store; the others wait for what it published (or why not).
        return distributed.from_leader(world, lambda: publishing.publish(ctx, prep, measured, world,
                                                                          tmp / "checkpoint"))
