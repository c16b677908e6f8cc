"""The local driver's pure parts: state transitions, resume numbering, reconcile, status table, CLI config."""

from __future__ import annotations

import json

import pytest

from selflearn.checkpoints import CheckpointStore
from selflearn.cli import build_parser
from selflearn.local.cli import build_config
from selflearn.local.recovery import reconcile, remove_incomplete
from selflearn.local.state import apply_result, new_state, next_round, startup_serving
from selflearn.local.state import short_id as checkpoint_id
from selflearn.local.state_file import load_state, save_state
from selflearn.local.status import format_table
from selflearn.spec import RunConfig, parse_spec


def cfg(tmp_path, **promotion):
    return RunConfig(name="local", spec=parse_spec({"storage": {"uri": f"file://{tmp_path}/store"},
                                                   "training": {"chatEval": False}, "promotion": promotion}))


def run_spec(**promotion):
    """The spec the gate reads: these rounds measure perplexity only (chatEval off)."""
    return parse_spec({"training": {"chatEval": False}, "promotion": promotion})


def published(round_, general=(20.0, 19.0), fresh=(30.0, 29.0)):
    uri = f"file:///s/local/r{round_:06d}"
    return {"status": "published", "round": round_, "checkpoint": uri, "id": f"local/r{round_:06d}",
            "metrics": {"train_loss": 2.5, "ppl": {"general": dict(zip(("before", "after"), general)),
                                                    "fresh": dict(zip(("before", "after"), fresh))}}}


MANIFEST = {"metrics": {"losses": [3.0, 2.8, 2.5]}, "published_at": 100.0,
            "articles": [{"title": "<script>alert(1)</script>", "url": "https://en.wikipedia.org/wiki/X", "sha256": "ab"}]}


def test_promoted_round_moves_serving_and_counter(tmp_path):
    st = new_state(cfg(tmp_path))
    st2, action = apply_result(st, published(1), MANIFEST, run_spec())
    assert st["round"] == 0 and st["rounds"] == []  # pure: the input is untouched
    assert st2["round"] == 1 and st2["promoted"] == "file:///s/local/r000001" and st2["promoted_id"] == "local/r000001"
    assert action.serve == "file:///s/local/r000001" and action.promote
    rec = st2["rounds"][0]
    assert rec["promoted"] and rec["losses"] == [3.0, 2.8, 2.5] and rec["articles"][0]["url"].startswith("https://")


def test_rejected_round_keeps_serving_and_records_reason(tmp_path):
    st, _ = apply_result(new_state(cfg(tmp_path)), published(1), MANIFEST, run_spec())
    st["serving"] = st["promoted"]
    st2, action = apply_result(st, published(2, general=(20.0, 40.0)), MANIFEST, run_spec())
    assert action.serve is None and not action.promote
    assert st2["promoted"] == "file:///s/local/r000001" and st2["round"] == 2
    assert not st2["rounds"][-1]["promoted"] and st2["rounds"][-1]["reason"].startswith("rejected: general")


def test_failed_round_is_retried_under_the_same_number(tmp_path):
    st = new_state(cfg(tmp_path))
    st, action = apply_result(st, {"status": "failed", "round": 1, "reason": "trainer exited with 1"}, None,
                              run_spec())
    assert st["round"] == 0 and action.serve is None and next_round(st) == 1
    st, _ = apply_result(st, published(1), MANIFEST, run_spec())
    assert [r["status"] for r in st["rounds"]] == ["published"]  # the failed attempt is superseded


def test_empty_round_advances(tmp_path):
    st, action = apply_result(new_state(cfg(tmp_path)), {"status": "empty", "round": 1, "reason": "empty round"},
                              None, run_spec())
    assert st["round"] == 1 and action.serve is None and st["rounds"][0]["reason"] == "empty round"


def test_pin_serves_the_pin(tmp_path):
    pin = "file:///s/local/r000001"
    st = {**new_state(cfg(tmp_path)), "serving": "file:///s/local/r000002"}
    st, action = apply_result(st, published(3), MANIFEST, run_spec(pinnedCheckpoint=pin))
    assert action.serve == pin and st["promoted"] == pin and st["rounds"][-1]["outcome"] == "pin"
    assert startup_serving(st, run_spec(pinnedCheckpoint=pin).promotion, "file:///s/local/r000002") == pin
    assert startup_serving(st, run_spec().promotion, "file:///s/local/r000002") == "file:///s/local/r000002"


def test_next_round_takes_the_furthest_evidence(tmp_path):
    st = {**new_state(cfg(tmp_path)), "round": 3}
    assert next_round(st) == 4
    assert next_round(st, store_last_round=5) == 6
    assert next_round(st, latest_published=7) == 8


def test_state_file_roundtrip_and_guards(tmp_path):
    c = cfg(tmp_path)
    path = tmp_path / "state.json"
    assert load_state(path, c)["round"] == 0
    st = {**new_state(c), "round": 4}
    save_state(path, st)
    assert load_state(path, c)["round"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    other = RunConfig(name="other", spec=c.spec)
    with pytest.raises(ValueError, match="belongs to run"):
        load_state(path, other)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_state(path, c)


def test_reconcile_records_checkpoints_published_after_the_last_record(tmp_path):
    c = cfg(tmp_path)
    store = CheckpointStore.from_uri(c.spec.storage.uri)
    src = tmp_path / "w"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x")
    m = {"metrics": published(1)["metrics"] | {"losses": [1.0]}, "articles": [], "parent": None}
    ref = store.publish("local", 1, src, m)
    (tmp_path / "store" / "local" / "r000002").mkdir()
    (tmp_path / "store" / "local" / "r000002" / "model.safetensors").write_bytes(b"half")
    st, action = reconcile(new_state(c), store, c.spec)
    assert st["round"] == 1 and st["rounds"][0]["id"] == ref.id and action.serve == ref.uri
    assert reconcile(st, store, c.spec)[1] is None  # idempotent
    assert remove_incomplete(store, "local") == ["r000002"]
    assert [r.round for r in store.list("local")] == [1]


def test_status_table_is_plain_text(tmp_path):
    st, _ = apply_result(new_state(cfg(tmp_path)), published(1), MANIFEST, run_spec())
    st["rounds"][0]["reason"] = "evil\x1b[2Jreason"
    out = format_table(st, articles=True)
    assert "promoted" in out and "20.00->19.00" in out and "local/r000001" in out
    assert "\x1b" not in out and "https://en.wikipedia.org/wiki/X" in out


def test_checkpoint_id():
    assert checkpoint_id("file:///a/b/local/r000003") == "local/r000003"
    assert checkpoint_id(None) is None


def test_cli_flags_build_a_network_free_config(tmp_path):
    p = build_parser()
    c = build_config(p.parse_args(["local", "--data-dir", str(tmp_path)]))
    assert c.spec.base_model == "embedded:smollm2-135m-instruct"
    assert c.spec.sources[0].snapshot.language == "en"
    assert c.spec.storage.uri == f"file://{tmp_path.resolve()}/checkpoints"
    assert c.spec.schedule.interval_seconds > 0
    assert c.spec.feedback is not None, "the chat's feedback is learned by default"
    assert build_config(p.parse_args(["local", "--data-dir", str(tmp_path), "--no-feedback"])).spec.feedback is None
    c = build_config(p.parse_args(["local", "--data-dir", str(tmp_path), "--source", "snapshot:fr", "--source",
                                   f"files:{tmp_path}", "--articles", "5", "--store", "s3://b/p",
                                   "--learning-rate", "1e-3", "--pin", "s3://b/p/local/r000001"]))
    assert c.spec.sources[0].snapshot.language == "fr" and c.spec.sources[0].snapshot.articles_per_round == 5
    assert c.spec.sources[1].files.paths == [str(tmp_path.resolve())]
    assert c.spec.storage.uri == "s3://b/p" and c.spec.training.learning_rate == 1e-3
    assert c.spec.promotion.pinned_checkpoint == "s3://b/p/local/r000001"
    with pytest.raises(ValueError, match="expected snapshot"):
        build_config(p.parse_args(["local", "--source", "ftp:x"]))


def test_status_cli_reads_the_state(tmp_path, capsys):
    from selflearn.cli import main

    st, _ = apply_result(new_state(cfg(tmp_path)), published(1), MANIFEST, run_spec())
    save_state(tmp_path / "state.json", st)
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    assert "local/r000001" in capsys.readouterr().out
    assert main(["status", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["round"] == 1
    assert main(["status", "--data-dir", str(tmp_path / "nope")]) == 2


def test_a_round_record_carries_knowledge_chat_health_and_examples(tmp_path):
    res = published(1)
    res["metrics"].update({"knowledge": {"learned": {"before": 0.2, "after": 0.4},
                                         "held_out": {"before": 0.21, "after": 0.2}},
                           "chat": {"retention": 0.97, "format_ok": {"before": 1.0, "after": 1.0}}})
    manifest = {**MANIFEST, "probe": {"examples": [{"question": "What is Chard?", "parent": "A mushroom.",
                                                    "candidate": "A leafy vegetable.", "parent_score": 0.0,
                                                    "candidate_score": 1.0}]}}
    st, _ = apply_result(new_state(cfg(tmp_path)), res, manifest, run_spec())
    rec = st["rounds"][0]
    assert rec["promoted"] and rec["knowledge"]["learned"]["after"] == 0.4 and rec["chat"]["retention"] == 0.97
    out = format_table(st)
    assert "0.20->0.40" in out and "0.970" in out and "100%" in out
    assert "Q: What is Chard?" in out and "candidate (1.00): A leafy vegetable." in out


def test_a_round_record_says_which_feedback_it_learned(tmp_path):
    res = published(1)
    res["metrics"]["feedback"] = {"corrections": 2, "ratings": 8, "pending": 0, "dropped": {"duplicate": 1}}
    manifest = {**MANIFEST, "feedback": [{"id": "ab12", "kind": "correction"}, {"id": "cd34", "kind": "up"}]}
    st, _ = apply_result(new_state(cfg(tmp_path)), res, manifest, run_spec())
    assert st["rounds"][0]["feedback"]["ids"] == ["ab12", "cd34"]
    assert "2 fix, 8 rated" in format_table(st)
    res2 = published(2)
    res2["metrics"]["feedback"] = {"error": "feedback store unavailable: EndpointConnectionError",
                                   "corrections": 0, "ratings": 0}
    st, _ = apply_result(st, res2, MANIFEST, run_spec())
    assert "unavailable" in format_table(st)
    res3 = published(3)  # a run without a feedback source
    st, _ = apply_result(st, res3, MANIFEST, run_spec())
    assert st["rounds"][-1]["feedback"] is None


def test_status_shows_the_running_round_live(tmp_path):
    st = new_state(cfg(tmp_path))
    st["current_round"] = {"round": 3, "started_at": 100.0,
                           "progress": {"phase": "training", "step": 4, "of": 18, "loss": 1.9, "tokens_per_s": 265,
                                        "eta_s": 52}}
    out = format_table(st, now=130.0)
    assert "training round 3 for 30s: training, step 4/18, loss 1.900, 265 tok/s, ETA 52s" in out


def test_trainer_progress_file_follows_the_round(tmp_path):
    from selflearn.trainer.cli import ProgressFile

    path = tmp_path / "p" / "progress.json"
    pf = ProgressFile(path)
    assert json.loads(path.read_text())["phase"] == "starting"
    pf({"event": "phase", "phase": "training"})
    pf({"event": "step", "step": 2, "of": 9, "loss": 2.0, "tokens_per_s": 250.0, "eta_s": 30.0, "lr": 1e-4})
    doc = json.loads(path.read_text())
    assert doc["phase"] == "training" and doc["step"] == 2 and doc["of"] == 9 and doc["eta_s"] == 30.0
    assert "lr" not in doc
