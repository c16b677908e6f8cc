"""Feedback learned for real: corrections posted through /feedback on the real serving app are
learned by the next round on the embedded model, and a round reads what serving wrote to S3."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from selflearn.checkpoints import CheckpointStore
from selflearn.feedback import client_hash
from selflearn.policy import decide
from selflearn.serving.state import FeedbackStore
from selflearn.sources import feedback as feedback_source
from selflearn.spec import RunConfig, parse_spec
from selflearn.trainer.round import run_round

FACTS = json.loads((Path(__file__).parent / "data" / "made_up_facts.json").read_text())["facts"][:10]


def recalled(answers: list[str], keys: list[str]) -> int:
    return sum(k.lower() in a.lower() for a, k in zip(answers, keys))


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


@pytest.mark.full
def test_corrections_from_the_chat_are_learned_by_the_next_round(http, srv, tmp_path):
    from selflearn import basemodel
    from selflearn.trainer import probe
    from selflearn.trainer.model_io import load_checkpoint_model

    ids, before = [], []
    for f in FACTS:
        r = http.post("/chat", json={"message": f["question"], "temperature": 0, "max_length": 40}).json()
        before.append(r["reply"])
        # What the chat page sends on 👎 with a correction.
        fb = http.post("/feedback", json={"rating": "down", "response_id": r["response_id"],
                                          "conversation_id": r["conversation_id"], "prompt": f["question"],
                                          "reply": r["reply"], "checkpoint": r["checkpoint"],
                                          "correction": f["correction"]})
        assert fb.status_code == 201 and "next training round" in fb.json()["learn"], fb.text
        ids.append(fb.json()["id"])
    assert recalled(before, [f["answer"] for f in FACTS]) <= 1, "the base model cannot know made-up facts"
    cfg = RunConfig(name="fb", spec=parse_spec({
        "sources": [{"snapshot": {"language": "en", "articlesPerRound": 2}},
                    {"feedback": {"uri": f"file://{srv.feedback_dir}", "perClientCap": 50, "graceSeconds": 0}}],
        "training": {"maxLength": 128, "batchSize": 4, "gradientAccumulation": 1, "learningRate": 1.0e-4,
                     "epochs": 1, "evalArticles": 1, "generalArticles": 2, "qaPairsPerArticle": 1, "chatReplay": 8},
        # Two articles are little text against a drift of the general perplexity: allow +5%.
        "promotion": {"maxPerplexityIncrease": 0.05},
        "storage": {"uri": f"file://{tmp_path}/store"}}))
    res = run_round(cfg, 1, parent="base")
    assert res.status == "published", res.reason
    decision = decide(cfg.spec, res.metrics, candidate=res.checkpoint)
    assert decision.promote and "corrections preferred" in decision.reason, decision.reason
    store = CheckpointStore.from_uri(cfg.spec.storage.uri)
    manifest = store.manifest(res.checkpoint)
    learned = {f["id"]: f for f in manifest["feedback"]}
    assert set(ids) <= set(learned) and all(learned[i]["kind"] == "correction" for i in ids)
    assert all(len(learned[i]["sha256"]) == 64 and learned[i]["client"] for i in ids)
    assert res.metrics.feedback.corrections >= len(ids)

    model = load_checkpoint_model(tmp_path / "cand", store.download(res.checkpoint, tmp_path / "cand"))
    tok = basemodel.load_tokenizer(str(tmp_path / "cand"))
    keys = [f["answer"] for f in FACTS]
    same = [g.text for g in probe.generate(model, tok, [f["question"] for f in FACTS], max_new_tokens=48)]
    para = [g.text for g in probe.generate(model, tok, [f["paraphrase"] for f in FACTS], max_new_tokens=48)]
    assert recalled(same, keys) >= 8, same
    assert recalled(para, keys) >= 5, para

    # Read once, learned once: the next round finds nothing new in what it already consumed.
    cursor = (store.get_json("fb/state.json") or {})["cursors"]["feedback"]
    again = feedback_source.collect(cfg.spec.feedback, store, "fb", cursor,
                                    history=feedback_source.FeedbackHistory({f["sha256"] for f in manifest["feedback"]}))
    assert not again.learned and again.error is None


def test_a_round_reads_what_serving_wrote_to_s3_within_the_caps(tmp_path, s3_server, tiny_opt_dir):
    endpoint, make_bucket = s3_server
    make_bucket("feedback-run")
    uri = "s3://feedback-run/runs"
    # Exactly what /feedback writes, into the run's own store on S3.
    writer = FeedbackStore(f"{uri}/opt/feedback", endpoint=endpoint)
    at = time.time() - 120

    def put(i, client, prompt, correction, rating="down"):
        writer.put({"id": f"i{i:04d}", "at": at + i * 0.001, "matched": True, "rating": rating, "prompt": prompt,
                    "reply": "I do not know.", "checkpoint": None, "correction": correction,
                    "client": client_hash(client)})

    for i in range(500):  # one client, 500 contradicting corrections of one question
        put(i, "10.0.0.66", "Who rules Dravenholt?", f"Dravenholt is ruled by King Number {i}.")
    put(600, "10.0.0.1", "What is the capital of Veldoria?", "The capital of Veldoria is Marrowick.")
    put(601, "10.0.0.1", "What is the capital of Veldoria?", "The capital of Veldoria is Marrowick.")  # again
    for j in range(3):
        put(700 + j, f"10.0.1.{j}", f"What is the currency of Lumeria {j}?", f"The currency is the glint {j}.")
    for j in range(8):  # thumbs without corrections: enough of them (minRatings) to learn with KTO
        put(800 + j, f"10.0.2.{j}", f"Say something nice {j}.", None, rating="up" if j % 2 else "down")
    CheckpointStore.from_uri(uri, endpoint=endpoint).backend.put_bytes(
        f"opt/feedback/{time.strftime('%Y-%m-%d', time.gmtime(at))}/{int(at * 1000):013d}-broken.json", b"{oops")

    spec = {"baseModel": tiny_opt_dir, "storage": {"uri": uri, "endpoint": endpoint},
            # Feedback only: a round can learn from its users alone.
            "sources": [{"feedback": {"perClientCap": 5}}],
            "training": {"maxLength": 64, "batchSize": 2, "gradientAccumulation": 1, "learningRate": 2.0e-4,
                         "chatEval": False, "format": "text", "chatReplay": 0, "evalArticles": 1,
                         "generalArticles": 2, "epochs": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "opt", "spec": spec}))
    proc = subprocess.run([sys.executable, "-m", "selflearn.trainer", "--run-config", str(path), "--round", "1",
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip())
    manifest = CheckpointStore.from_uri(uri, endpoint=endpoint).manifest(result["checkpoint"])
    learned = {f["id"]: f["kind"] for f in manifest["feedback"]}
    # The flood adds one item (its latest within the cap), the duplicate trains once.
    ratings = {f"i{800 + j:04d}": "up" if j % 2 else "down" for j in range(8)}
    assert learned == {"i0004": "correction", "i0601": "correction", "i0700": "correction",
                       "i0701": "correction", "i0702": "correction", **ratings}
    assert client_hash("10.0.0.66") in {f["client"] for f in manifest["feedback"]}
    fb = result["metrics"]["feedback"]
    assert fb["corrections"] == 5 and fb["ratings"] == 8 and fb["judged"] == 8 and fb["preference_steps"] > 0
    assert fb["dropped"] == {"over the per-client cap": 495, "superseded": 4, "duplicate": 1, "invalid": 1}
