"""A round's learning from its users' feedback, after the main training: the corrections' own
pass, then the preference phase (selflearn.trainer.preference), and what the round reports."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..contracts import FeedbackMetrics, PreferenceMetrics
from ..sources.feedback import FeedbackRound
from ..spec import RunConfig
from . import data, knowledge, loop, preference


def correction_batches(config: RunConfig, round_: int, tok: Any, fb: preference.FeedbackData,
                       refs: dict[str, list[dict]] | None, chat: knowledge.ChatData | None,
                       text: list[list[int]]) -> list:
    """The corrections' own pass, `feedback.epochs` times over: each correction under every
    phrasing. After the main training, because what a small model learns last is what it answers
    with. Beside them, so that the pass does not undo the rest of the round: replayed chat answers
    (short answers alone would cost the chat's manners), the round's question/answer pairs (and
    what it just learned of its articles) and a different share of the round's text in each pass
    (and its prose)."""
    spec = config.spec
    replay = knowledge.replay_examples(tok, refs["replay"] if refs else [], spec.training.chat_replay, round_ + 1)
    own = chat.examples[:len(chat.pairs)] if chat else []
    passes = spec.feedback.epochs
    blocks = []
    for i in range(passes):
        # The round's pairs once, in the last pass: in every pass they lift the general perplexity
        # past the gate (+4 to +9% measured).
        blocks += data.pack_examples(fb.examples + replay + (own if i == passes - 1 else []), text[i::passes],
                                     spec.training.max_length, tok.eos_token_id)
    return data.batches(blocks, spec.training.batch_size)


def learn(model: Any, tok: Any, config: RunConfig, round_: int, fb: preference.FeedbackData,
          refs_fb: preference.References, cfg: loop.LoopConfig, *, chat: knowledge.ChatData | None,
          refs: dict[str, list[dict]] | None, text: list[list[int]], master: Any, prefer: bool,
          on_step: Callable[[dict], None] | None, progress: bool, phase: Callable[[str], None]) -> dict[str, Any]:
    """The corrections' pass and the preference phase; -> their stats."""
    spec = config.spec
    out: dict[str, Any] = {}
    if fb.examples:
        phase("learning corrections")
        # The passes are laid out in the batches (each with its own share of text): one epoch.
        pass_cfg = dataclasses.replace(cfg, epochs=1, gradient_accumulation=1, warmup_ratio=0.0,
                                       learning_rate=spec.feedback.learning_rate or cfg.learning_rate)
        out["corrections"] = loop.train(model, correction_batches(config, round_, tok, fb, refs, chat, text),
                                        pass_cfg, master=master, on_step=on_step, progress=progress)
    if prefer:
        phase("learning preferences")
        fs = spec.feedback
        out["preference"] = preference.train(model, tok, fb, refs_fb, preference.PreferenceConfig(
            beta=fs.beta, learning_rate=fs.preference_learning_rate, epochs=fs.preference_epochs,
            sft_weight=fs.sft_weight, precision=cfg.precision, seed=cfg.seed), master=master, on_step=on_step)
    return out


def metrics(fb_round: FeedbackRound, fb: preference.FeedbackData | None, refs_fb: preference.References | None,
            stats: dict[str, Any], model: Any, tok: Any, precision: str) -> FeedbackMetrics:
    """What the round reports about feedback; `preference` (held-out phrasings, parent -> candidate)
    is what the gate reads."""
    out = FeedbackMetrics.model_validate(fb_round.summary())
    if fb is None:
        return out
    pref = None
    if fb.held_out and refs_fb is not None:
        pref = PreferenceMetrics(before=refs_fb.held_out_rate, pairs=len(fb.held_out),
                                 after=preference.preference_rate(model, tok, fb.held_out, precision=precision))
    corrections, prefs = stats.get("corrections"), stats.get("preference")
    return out.model_copy(update={
        "pairs": len(fb.pairs), "judged": len(fb.judged), "preference": pref,
        "correction_steps": corrections.steps if corrections else None,
        "correction_loss": corrections.final_loss if corrections else None,
        "preference_steps": prefs["steps"] if prefs else None})
