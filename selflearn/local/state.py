"""Local mode's decisions: pure functions over the run's state dict (no I/O, no Ray, no model).

The state is a JSON document (`state_file` writes it, the dashboard and `selflearn status` read
it): the round counter, the promoted and the serving checkpoint, the running round and one
record per finished round. Every function here returns a new state and leaves its input alone.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Mapping, Union

from ..contracts import RoundMetrics, RoundResult, checkpoint_id_of_uri
from ..policy import Decision, Outcome, decide, switch_to
from ..spec import LearnerRunSpec, PromotionSpec, RunConfig

STATE_VERSION = 1
MAX_LOSS_POINTS = 400  # per round, in the state file (the manifest keeps all of them)

# A round's result as the driver has it, or as its JSON document (the trainer's line, parsed).
AnyResult = Union[RoundResult, Mapping[str, Any]]


def new_state(config: RunConfig) -> dict[str, Any]:
    return {"version": STATE_VERSION, "run": config.name, "base_model": config.spec.base_model,
            "store": config.spec.storage.uri, "round": 0, "promoted": None, "promoted_id": None,
            "serving": None, "serving_id": None, "phase": "starting", "current_round": None,
            "rounds": [], "updated_at": time.time()}


def short_id(uri: str | None) -> str | None:
    """`file:///x/local/r000003` -> `local/r000003` (the id serving reports); None (the base
    model, nothing promoted yet) stays None."""
    return checkpoint_id_of_uri(uri) if uri else None


def as_round_result(result: AnyResult) -> RoundResult:
    return result if isinstance(result, RoundResult) else RoundResult.from_json(result)


def downsample(xs: list[float], n: int) -> list[float]:
    """At most `n` points of `xs`, evenly spaced (a loss curve the dashboard can draw)."""
    if len(xs) <= n:
        return list(xs)
    step = len(xs) / n
    return [xs[int(i * step)] for i in range(n)]


def round_record(result: RoundResult, manifest: dict[str, Any] | None,
                 decision: Decision | None) -> dict[str, Any]:
    """What the dashboard and `selflearn status` show about one round."""
    manifest = manifest or {}
    # The result line leaves the per-step losses out: the manifest has them.
    m = result.metrics or RoundMetrics()
    losses = m.losses or (RoundMetrics.parse(manifest.get("metrics")).losses if manifest.get("metrics") else [])

    def doc(part: Any) -> Any:
        return part.model_dump(mode="json", exclude_none=True) if part is not None else {}

    return {
        "round": result.round,
        "status": result.status,
        "checkpoint": result.checkpoint,
        "id": result.id or short_id(result.checkpoint),
        "parent": result.parent or manifest.get("parent"),
        "promoted": bool(decision and decision.promote),
        "outcome": decision.outcome.value if decision else None,
        "reason": decision.reason if decision else result.reason,
        "train_loss": m.train_loss,
        "losses": downsample(list(losses), MAX_LOSS_POINTS),
        "ppl": {k: doc(v) for k, v in m.ppl.items()},
        "steps": m.steps,
        "train_seconds": m.train_seconds,
        "tokens_per_s": m.tokens_per_s,
        "articles": [{"title": a.get("title"), "url": a.get("url"), "sha256": a.get("sha256")}
                     for a in manifest.get("articles") or []],
        "held_out": m.held_out,
        "dropped": m.dropped,
        # What a chat user notices: answers about the learned and held-out articles, chat manners.
        "knowledge": doc(m.knowledge),
        "chat": doc(m.chat),
        "format": m.format,
        "qa_pairs": m.qa_pairs,
        # What users said that this round learned (ids as /feedback answered them).
        "feedback": {**doc(m.feedback), "ids": [f.get("id") for f in manifest.get("feedback") or []]}
        if m.feedback is not None else None,
        "examples": (manifest.get("probe") or {}).get("examples") or [],  # a few, chosen by the trainer
        "published_at": manifest.get("published_at"),
        "finished_at": time.time(),
    }


@dataclass(frozen=True)
class Action:
    """What the driver must do after a round: point serving (and the store's pointer) at `serve`."""

    serve: str | None
    promote: bool  # move the store's promoted pointer to `serve` (a promotion or a pin)
    decision: Decision | None


def decide_round(state: dict[str, Any], result: RoundResult, spec: LearnerRunSpec) -> Decision | None:
    if result.status != "published":
        return None
    return decide(spec, result.metrics, candidate=result.checkpoint, serving=state.get("serving"))


def apply_result(state: dict[str, Any], result: AnyResult, manifest: dict[str, Any] | None,
                 spec: LearnerRunSpec) -> tuple[dict[str, Any], Action]:
    """Given a round's result and its manifest: the new state and the action.

    A published or empty round advances the round counter; a failed one does not (it is retried
    under the same number). Only a promoted checkpoint, or a pin, changes what serves.
    """
    result = as_round_result(result)
    state = copy.deepcopy(state)
    decision = decide_round(state, result, spec)
    rec = round_record(result, manifest, decision)
    state["rounds"] = [r for r in state["rounds"] if not (r.get("round") == rec["round"] and r.get("status") == "failed")]
    state["rounds"].append(rec)
    state["current_round"] = None
    if rec["status"] in ("published", "empty"):
        state["round"] = max(int(state.get("round") or 0), int(rec["round"]))
    serve = switch_to(decision, state.get("serving"))
    # The promoted pointer follows a promotion or a pin even when serving needs no move.
    moves = decision is not None and decision.outcome in (Outcome.PROMOTE, Outcome.PIN) and bool(decision.serve)
    if moves:
        state["promoted"], state["promoted_id"] = decision.serve, short_id(decision.serve)
    return state, Action(serve=serve, promote=moves, decision=decision)


def startup_serving(state: dict[str, Any], promotion: PromotionSpec, store_promoted: str | None) -> str | None:
    """What to serve at start: a pin wins, then the store's pointer, then the state's; None: the base model."""
    return promotion.pinned_checkpoint or store_promoted or state.get("promoted")


def next_round(state: dict[str, Any], *, store_last_round: int = 0, latest_published: int = 0) -> int:
    """One past everything anyone has seen: the state, the trainer's cursor state and the store."""
    return max(int(state.get("round") or 0), int(store_last_round or 0), int(latest_published or 0)) + 1
