"""Test support: real rounds on the embedded model, sized for tests, and the one round the fast
tier shares (conftest's `learned_round`).

A round on the embedded model costs 35-50 s here (two to three times that on a CPU without
AMX), so the tests that only read what a normal round learned and published share one, built on
first use, instead of each training its own. The gate's bad rounds (tests/test_gate_rounds.py)
train in the same store under the same run, so the base model's answers on the fixed probe sets
are measured once for all of them (the store keeps them as base_probe.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selflearn.checkpoints import CheckpointStore
from selflearn.contracts import RoundResult
from selflearn.policy import Decision, decide
from selflearn.spec import RunConfig, parse_spec
from selflearn.trainer.round import run_round

RUN = "gate"
# Small enough for a test, big enough that the gate's checks have something to measure: six
# articles, two epochs, the chat evaluation (knowledge and chat retention) on.
TINY_CHAT = {"maxLength": 128, "batchSize": 4, "gradientAccumulation": 1, "learningRate": 5.0e-5, "epochs": 2,
             "evalArticles": 2, "generalArticles": 2, "qaPairsPerArticle": 3, "chatReplay": 8}


def gate_config(storage: dict[str, Any], *, sources=None, promotion=None, **training) -> RunConfig:
    """The run the gate's tests train: TINY_CHAT with `training` overrides, into `storage`."""
    return RunConfig(name=RUN, spec=parse_spec({
        "sources": sources or [{"snapshot": {"language": "en", "articlesPerRound": 6}}],
        "training": {**TINY_CHAT, **training}, "promotion": promotion or {}, "storage": storage}))


def judge(config: RunConfig, round_: int, *, parent: str = "base") -> tuple[RoundResult, Decision]:
    """Train round `round_` of `config` from `parent`, and the one promotion policy's verdict on it."""
    res = run_round(config, round_, parent=parent)
    assert res.status == "published", res.reason
    return res, decide(config.spec, res.metrics, candidate=res.checkpoint)


@dataclass(frozen=True)
class LearnedRound:
    config: RunConfig
    result: RoundResult
    decision: Decision
    workdir: Path

    @property
    def storage(self) -> dict[str, Any]:
        return self.config.spec.storage.model_dump(by_alias=True, exclude_none=True)

    @property
    def store(self) -> CheckpointStore:
        st = self.config.spec.storage
        return CheckpointStore.from_uri(st.uri, endpoint=st.endpoint)

    def next_round(self) -> int:
        """The next free round number of the shared run (other tests train in it too)."""
        return max(r.round for r in self.store.list(RUN)) + 1


def learn_one_round(*, uri: str, endpoint: str | None, workdir: Path) -> LearnedRound:
    # Kept beyond the default five: the full tier trains four more rounds into this run.
    storage = {"uri": uri, "keepCheckpoints": 20, **({"endpoint": endpoint} if endpoint else {})}
    config = gate_config(storage)
    res, decision = judge(config, 1)
    return LearnedRound(config, res, decision, workdir)
