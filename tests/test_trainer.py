"""A training round end to end: real models, real stores, bad input refused before training."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from selflearn.checkpoints import CheckpointStore
from selflearn.memory import Memory
from selflearn.sources.base import Article
from selflearn.spec import RunConfig, load_run_config, parse_spec
from selflearn.trainer.round import run_round

TINY = {"maxLength": 64, "batchSize": 2, "gradientAccumulation": 1, "learningRate": 2.0e-4, "chatEval": False,
        "evalArticles": 1, "generalArticles": 2, "epochs": 1}


class ListSource:
    """A real Source over given articles (stands in for a live fetch)."""

    name = "list"

    def __init__(self, articles):
        self.articles = articles

    def fetch(self, n, cursor):
        start = cursor.get("next", 0)
        return self.articles[start:start + n], {"next": start + n}


def config(tmp_path, model: str, **training) -> RunConfig:
    return RunConfig(name="t", spec=parse_spec({
        "baseModel": model, "sources": [{"snapshot": {"language": "en", "articlesPerRound": 3}}],
        "training": {**TINY, **training}, "storage": {"uri": f"file://{tmp_path}/store"}}))


def test_a_round_on_the_embedded_model_learns_and_publishes_to_s3(learned_round, tmp_path):
    res, cfg = learned_round.result, learned_round.config
    assert res.status == "published" and res.checkpoint == "s3://learned/runs/gate/r000001"
    ppl = res.metrics.ppl
    assert ppl["trained"].after < ppl["trained"].before, "the round learned its articles"
    assert set(ppl) == {"fresh", "trained", "general"}
    manifest = learned_round.store.download(res.checkpoint, tmp_path / "dl")
    assert manifest["parent"] is None and manifest["base_model"] == "embedded:smollm2-135m-instruct"
    arts = manifest["articles"]
    assert len(arts) == cfg.spec.sources[0].snapshot.articles_per_round and all(len(a["sha256"]) == 64 for a in arts)
    assert manifest["hyperparameters"]["learningRate"] == cfg.spec.training.learning_rate
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert {p.name for p in (tmp_path / "dl").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    # Its memory is checkpoint files like the weights (sha256 in the manifest) and holds what it learned.
    assert {"memory/memory.json", "memory/passages.jsonl"} <= set(manifest["files"])
    assert all(len(manifest["files"][f]["sha256"]) == 64 for f in manifest["files"] if f.startswith("memory/"))
    memory = Memory.load(tmp_path / "dl")
    assert memory is not None and res.metrics.memory_passages == len(memory.passages)
    assert {p.title for p in memory.passages} == {a["title"] for a in arts}
    assert {p.learned_in for p in memory.passages} == {res.id}


def next_round_continues(cfg: RunConfig, first, round_: int, store: CheckpointStore):
    """Round `round_` trained from `first` (downloaded from its store): its parent, no article of
    `first` again, and the fixed general set measured on `first`'s weights as `first` left them."""
    res = run_round(cfg, round_, parent=first.checkpoint)
    assert res.status == "published" and res.parent == first.checkpoint
    m1, m2 = store.manifest(first.checkpoint), store.manifest(res.checkpoint)
    assert m2["parent"] == first.checkpoint
    assert not {a["sha256"] for a in m2["articles"]} & {a["sha256"] for a in m1["articles"]}
    # What round 1 measured after training, not the base model's figure: the weights came through.
    g1, g2 = first.metrics.ppl["general"], res.metrics.ppl["general"]
    assert g1.after != pytest.approx(g1.before, rel=2e-3)
    assert g2.before == pytest.approx(g1.after, rel=2e-3)
    # The new memory is self-contained: the parent's passages and this round's articles, nothing else.
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:  # two checkpoints: 1.1 GB on the real model
        dl = Path(tmp)
        store.download(first.checkpoint, dl / "m1")
        store.download(res.checkpoint, dl / "m2")
        mem1, mem2 = Memory.load(dl / "m1"), Memory.load(dl / "m2")
    assert mem1 is not None and mem2 is not None
    assert mem2.passages[:len(mem1.passages)] == mem1.passages
    assert {p.title for p in mem2.passages[len(mem1.passages):]} == {a["title"] for a in m2["articles"]}
    assert {p.learned_in for p in mem2.passages[len(mem1.passages):]} == {res.id}


def test_the_next_round_on_s3_starts_from_the_last_and_never_repeats_an_article(tmp_path, s3_server, tiny_llama_dir):
    endpoint, make_bucket = s3_server
    make_bucket("chain")
    cfg = config(tmp_path, tiny_llama_dir, learningRate=1.0e-3)
    cfg.spec.storage.uri, cfg.spec.storage.endpoint = "s3://chain/runs", endpoint
    store = CheckpointStore.from_uri(cfg.spec.storage.uri, endpoint=endpoint)
    next_round_continues(cfg, run_round(cfg, 1), 2, store)


@pytest.mark.full
def test_the_next_round_on_the_embedded_model_starts_from_the_last(learned_round):
    """Multi-round learning on the real model, its parent's weights downloaded from S3."""
    next_round_continues(learned_round.config, learned_round.result, learned_round.next_round(), learned_round.store)


def test_opt_path_full_replay_and_lora(tmp_path, tiny_opt_dir):
    res = run_round(config(tmp_path, tiny_opt_dir, memory=False), 1)
    assert res.status == "published" and res.metrics.memory_passages is None
    files = CheckpointStore.from_uri(f"file://{tmp_path}/store").manifest(res.checkpoint)["files"]
    assert not any(f.startswith("memory/") for f in files)  # training.memory: false keeps weights only
    assert res.metrics.ppl["trained"].after < res.metrics.ppl["trained"].before
    # Replay mixes round 1's articles back into round 2.
    res2 = run_round(config(tmp_path, tiny_opt_dir, replayFraction=0.5), 2)
    assert res2.metrics.replayed >= 1 and res2.parent == res.checkpoint
    lora = config(tmp_path, tiny_opt_dir, method="lora", lora={"r": 4, "alpha": 8, "merge": False})
    lora.name = "lora"
    res = run_round(lora, 1)
    files = CheckpointStore.from_uri(f"file://{tmp_path}/store").manifest(res.checkpoint)["files"]
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    # The next round continues the same adapter on top of the base model.
    res2 = run_round(lora, 2)
    assert res2.status == "published"


def test_empty_round_publishes_nothing(tmp_path, tiny_opt_dir):
    cfg = config(tmp_path, tiny_opt_dir)
    src = ListSource([Article(title="x", text="too short", source="list")])
    res = run_round(cfg, 1, sources=[src])
    assert res.status == "empty" and "filtered out" in res.reason
    assert CheckpointStore.from_uri(f"file://{tmp_path}/store").list("t") == []


@pytest.mark.parametrize("patch,message", [
    ({"training": {"learningRate": -1}}, "training.learningRate"),
    ({"training": {"precision": "fp8"}}, "training.precision"),
    ({"storage": {"uri": "ftp://x"}}, "storage.uri"),
    ({"sources": [{"snapshot": {}, "files": {"paths": ["a"]}}]}, "exactly one"),
    ({"trainng": {}}, "trainng"),
])
def test_bad_spec_is_one_clear_line(patch, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_spec(patch)
    assert "\n" not in str(err.value)


def test_cli_refuses_bad_runs_before_training(tmp_path, tiny_opt_dir, s3_server):
    endpoint, _ = s3_server

    def cli(spec: dict):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"name": "c", "spec": spec}))
        return subprocess.run([sys.executable, "-m", "selflearn.trainer", "--run-config", str(path),
                               "--round", "1", "--no-progress"], capture_output=True, text=True, timeout=300)

    store = {"uri": f"file://{tmp_path}/s"}
    cases = [
        ({"baseModel": tiny_opt_dir, "training": {"maxLength": 4096}, "storage": store}, "exceeds"),
        ({"baseModel": str(tmp_path / "nope"), "storage": store}, "unknown model"),
        ({"baseModel": tiny_opt_dir, "training": TINY, "storage": {"uri": "s3://missing/x", "endpoint": endpoint}},
         "not reachable"),
        ({"baseModel": tiny_opt_dir, "training": {"learningRate": 0}}, "learningRate"),
    ]
    for spec, message in cases:
        proc = cli(spec)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert message in last and last.startswith("selflearn train: error:"), last
    # And a good one prints exactly one JSON line.
    proc = cli({"baseModel": tiny_opt_dir, "training": TINY, "storage": store,
                "sources": [{"snapshot": {"articlesPerRound": 2}}]})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip())
    assert result["status"] == "published" and result["checkpoint"].endswith("/c/r000001")
    assert "training" in proc.stderr and "training: step" not in proc.stderr and "] training" not in proc.stderr, \
        "--no-progress: the log, without the round's progress lines"
    assert load_run_config(tmp_path / "run.yaml").name == "c"
