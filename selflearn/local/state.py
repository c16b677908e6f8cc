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

from ..contracts import RoundResult, checkpoint_id_of_uri
from ..policy import Decision, decide
from ..spec import PromotionSpec, RunConfig

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
    metrics = {**(manifest.get("metrics") or {}), **(result.metrics or {})}
    return {
        "round": result.round,
        "status": result.status,
        "checkpoint": result.checkpoint,
        "id": result.id or short_id(result.checkpoint),
        "parent": result.parent or manifest.get("parent"),
        "promoted": bool(decision and decision.promote),
        "reason": decision.reason if decision else result.reason,
        "train_loss": metrics.get("train_loss"),
        "losses": downsample(list(metrics.get("losses") or []), MAX_LOSS_POINTS),
        "ppl": metrics.get("ppl") or {},
        "steps": metrics.get("steps"),
        "train_seconds": metrics.get("train_seconds"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "articles": [{"title": a.get("title"), "url": a.get("url"), "sha256": a.get("sha256")}
                     for a in manifest.get("articles") or []],
        "held_out": metrics.get("held_out"),
        "dropped": metrics.get("dropped"),
        # What a chat user notices: answers about the learned and held-out articles, chat manners.
        "knowledge": metrics.get("knowledge") or {},
        "chat": metrics.get("chat") or {},
        "format": metrics.get("format"),
        "qa_pairs": metrics.get("qa_pairs"),
        # What users said that this round learned (ids as /feedback answered them).
        "feedback": {**(metrics.get("feedback") or {}),
                     "ids": [f.get("id") for f in manifest.get("feedback") or []]} if "feedback" in metrics else None,
        "examples": (manifest.get("probe") or {}).get("examples") or [],  # a few, chosen by the trainer
        "published_at": manifest.get("published_at"),
        "finished_at": time.time(),
    }


@dataclass(frozen=True)
class Action:
    """What the driver must do after a round: point serving (and the store's pointer) at `serve`."""

    serve: str | None
    promote: bool
    decision: Decision | None


def decide_round(state: dict[str, Any], result: RoundResult, promotion: PromotionSpec) -> Decision | None:
    if result.status != "published":
        return None
    return decide(promotion, result.metrics, candidate=result.checkpoint, serving=state.get("serving"))


def apply_result(state: dict[str, Any], result: AnyResult, manifest: dict[str, Any] | None,
                 promotion: PromotionSpec) -> tuple[dict[str, Any], Action]:
    """Given a round's result and its manifest: the new state and the action.

    A published or empty round advances the round counter; a failed one does not (it is retried
    under the same number). Only a promoted checkpoint, or a pin, changes what serves.
    """
    result = as_round_result(result)
    state = copy.deepcopy(state)
    decision = decide_round(state, result, promotion)
    rec = round_record(result, manifest, decision)
    state["rounds"] = [r for r in state["rounds"] if not (r.get("round") == rec["round"] and r.get("status") == "failed")]
    state["rounds"].append(rec)
    state["current_round"] = None
    if rec["status"] in ("published", "empty"):
        state["round"] = max(int(state.get("round") or 0), int(rec["round"]))
    serve = None
    if decision is not None and decision.serve and decision.serve != state.get("serving"):
        serve = decision.serve
    if decision is not None and decision.serve:
        state["promoted"], state["promoted_id"] = decision.serve, short_id(decision.serve)
    return state, Action(serve=serve, promote=bool(decision and decision.serve), decision=decision)


def startup_serving(state: dict[str, Any], promotion: PromotionSpec, store_promoted: str | None) -> str | None:
    """What to serve at start: a pin wins, then the store's pointer, then the state's; None: the base model."""
    return promotion.pinned_checkpoint or store_promoted or state.get("promoted")


def next_round(state: dict[str, Any], *, store_last_round: int = 0, latest_published: int = 0) -> int:
    """One past everything anyone has seen: the state, the trainer's cursor state and the store."""
    return max(int(state.get("round") or 0), int(store_last_round or 0), int(latest_published or 0)) + 1
