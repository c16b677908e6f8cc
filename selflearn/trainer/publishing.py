"""What a round publishes once it has trained and measured: the checkpoint's files (fp32 weights,
tokenizer, learned articles, memory, OpenVINO IR), its metrics and manifest, then the run's
cursors and retention. Rank 0's work alone in a round on several ranks."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointStore
from ..contracts import FeedbackMetrics, Pair, RoundMetrics, RoundResult
from . import distributed, knowledge, loop
from .context import Prepared, RoundContext
from .distributed import World
from .inputs import ARTICLES_FILE, STATE_KEY, RoundInputs
from .model_io import save_for_checkpoint

log = logging.getLogger("selflearn.trainer")


@dataclass(frozen=True)
class Measured:
    """What a round measured and trained, for its metrics and manifest."""

    stats: loop.LoopStats
    ppl_before: dict[str, float | None]
    ppl_after: dict[str, float | None]
    probe: knowledge.ProbeMetrics | None  # None: training.chatEval off
    shown: dict[str, Any] | None  # the example answers, parent vs candidate, for the manifest
    fb_metrics: FeedbackMetrics | None


def save(ctx: RoundContext, out: Path) -> None:
    """The candidate's weights in fp32, its tokenizer, and the articles it learned."""
    if ctx.master:
        ctx.master.restore_fp32(ctx.model)
    save_for_checkpoint(ctx.model, ctx.tokenizer, ctx.spec, out)
    with open(out / ARTICLES_FILE, "w") as f:
        for a in ctx.inputs.train:
            # source and extra (topic, description): a later round rebuilds the same questions.
            f.write(json.dumps({"title": a.title, "sha256": a.sha256, "text": a.text, "source": a.source,
                                "extra": a.extra}, default=str) + "\n")


def round_metrics(ctx: RoundContext, prep: Prepared, m: Measured) -> RoundMetrics:
    inputs, stats, chat, probed = ctx.inputs, m.stats, prep.chat, m.probe
    return RoundMetrics(
        train_loss=stats.final_loss,
        losses=[round(x, 4) for x in stats.losses],
        train_tokens=stats.tokens,
        train_seconds=round(stats.seconds, 2),
        tokens_per_s=round(stats.tokens_per_s, 1),
        steps=stats.steps,
        ppl={k: Pair(before=m.ppl_before[k], after=m.ppl_after[k]) for k in prep.sets if m.ppl_before[k] is not None},
        articles=len(inputs.train),
        held_out=len(inputs.held),
        replayed=len(prep.replay_docs),
        dropped=len(inputs.dropped),
        format=ctx.training.format,
        qa_pairs=len(chat.pairs) if chat else None,
        qa_read=chat.read if chat else None,
        chat_replayed=chat.replayed if chat else None,
        qa_reviewed=chat.reviewed if chat else None,
        text_only=len(chat.text_only) if chat else None,
        examples_too_long=prep.too_long if chat else None,
        knowledge=probed.knowledge if probed else None,
        chat=probed.chat if probed else None,
        probe_seconds=probed.probe_seconds if probed else None,
        parent_probe_reused=probed.parent_probe_reused if probed else None,
        feedback=m.fb_metrics,
        phase_seconds=ctx.phases.seconds(),
    )


def export_for_serving(ctx: RoundContext, checkpoint: Path) -> None:
    """The checkpoint's OpenVINO IR, published with it (sha256 in the manifest like the weights),
    when the run serves on OpenVINO: each replica then loads it in about a second instead of
    converting the weights itself. Where this trainer cannot export (openvino not installed, a
    model outside the Llama family) it publishes without, and replicas convert or serve on torch."""
    from .. import openvino_ir

    if ctx.config.spec.serving.engine == "torch":
        return
    if not openvino_ir.installed():
        log.info("publishing without OpenVINO IR: openvino is not installed in the trainer")
        return
    why = openvino_ir.unsupported(ctx.model.config)
    if why is None and (checkpoint / "adapter_config.json").is_file():
        why = "the checkpoint is a bare LoRA adapter (lora.merge: false)"
    if why:
        log.info("publishing without OpenVINO IR: %s", why)
        return
    ctx.phases("exporting")
    openvino_ir.export(checkpoint, checkpoint / openvino_ir.CHECKPOINT_SUBDIR)


def manifest(ctx: RoundContext, prep: Prepared, m: Measured, metrics: RoundMetrics,
              world: World = distributed.SOLO) -> dict[str, Any]:
    spec, inputs, chat, fb = ctx.spec, ctx.inputs, prep.chat, ctx.inputs.feedback
    return {
        "base_model": spec.base_model,
        "parent": ctx.parent.uri if ctx.parent else None,
        "method": spec.training.method,
        "adapter": spec.training.method == "lora" and not spec.training.lora.merge,
        "precision": ctx.precision,
        "device": ctx.device.type,
        # How many ranks trained it and how they shared the work (none: one process).
        "world": {"size": world.size, "strategy": world.strategy},
        "hyperparameters": spec.training.model_dump(by_alias=True, mode="json"),
        "metrics": metrics.to_json(),
        "articles": [a.provenance() for a in inputs.train],
        "held_out_articles": [a.provenance() for a in inputs.held],
        "dropped_articles": [{"title": t, "reason": r} for t, r in inputs.dropped],
        **({"qa_pairs": [{"title": p.title, "kind": p.kind, "question": p.question} for p in chat.pairs]}
           if chat else {}),
        **({"probe": m.shown} if m.shown else {}),
        **({"feedback": fb.traces(), "feedback_dropped": [{"id": i, "reason": r} for i, r in fb.dropped]}
           if fb else {}),
        "cursors": inputs.cursors,
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "started_at": ctx.started_at,
    }


def record_cursors(store: CheckpointStore, run: str, inputs: RoundInputs, round_: int) -> None:
    """Where each source continues next round, and the last round run (published or empty)."""
    store.put_json(f"{run}/{STATE_KEY}", {**inputs.state, "cursors": inputs.cursors, "last_round": round_})


def publish(ctx: RoundContext, prep: Prepared, measured: Measured, world: World, out: Path) -> RoundResult:
    """Write the checkpoint into `out`, publish it (files first, manifest last), then the cursors
    and retention."""
    save(ctx, out)
    if prep.memory is not None:
        prep.memory.save(out)
    export_for_serving(ctx, out)
    metrics = round_metrics(ctx, prep, measured).model_copy(
        update={"memory_passages": len(prep.memory.passages) if prep.memory else None})
    ctx.phases("publishing")
    ref = ctx.store.publish(ctx.run, ctx.round, out, manifest(ctx, prep, measured, metrics, world))
    record_cursors(ctx.store, ctx.run, ctx.inputs, ctx.round)
    ctx.store.retain(ctx.run, ctx.spec.storage.keep_checkpoints, protect=[ctx.parent.uri] if ctx.parent else [])
    log.info(json.dumps({"event": "published", "checkpoint": ref.uri,
                         "seconds": round(time.time() - ctx.started_at, 1)}))
    return RoundResult("published", ctx.round, checkpoint=ref.uri, metrics=metrics.summary(), id=ref.id,
                       parent=ctx.parent.uri if ctx.parent else None)
