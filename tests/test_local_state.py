"""The local driver's pure parts: state transitions (never in place), resume numbering, reconcile,
the state file, the status table, the terminal's round display, CLI config."""

from __future__ import annotations

import io
import json

import pytest
from pydantic import ValidationError

from selflearn.checkpoints import CheckpointStore
from selflearn.cli import build_parser
from selflearn.contracts import RoundProgress, RoundResult
from selflearn.local.cli import build_config
from selflearn.local.records import RoundManifest
from selflearn.local.recovery import reconcile, remove_incomplete
from selflearn.local import state as state_mod
from selflearn.local.state import LocalState, RunningRound, apply_result, new_state, next_round, startup_serving
from selflearn.local.state_file import STATE_FILE, load_state, save_state
from selflearn.local.status import format_table
from selflearn.spec import RunConfig, parse_spec


def cfg(tmp_path, **promotion):
    return RunConfig(name="local", spec=parse_spec({"storage": {"uri": f"file://{tmp_path}/store"},
                                                   "training": {"chatEval": False}, "promotion": promotion}))


def run_spec(**promotion):
    """The spec the gate reads: these rounds measure perplexity only (chatEval off)."""
    return parse_spec({"training": {"chatEval": False}, "promotion": promotion})


def published_doc(round_, general=(20.0, 19.0), fresh=(30.0, 29.0)):
    """A published round's result line, as the trainer prints it."""
    uri = f"file:///s/local/r{round_:06d}"
    return {"status": "published", "round": round_, "checkpoint": uri, "id": f"local/r{round_:06d}",
            "metrics": {"train_loss": 2.5, "ppl": {"general": dict(zip(("before", "after"), general)),
                                                    "fresh": dict(zip(("before", "after"), fresh))}}}


def published(round_, **kw):
    return RoundResult.from_json(published_doc(round_, **kw))


def result(doc):
    return RoundResult.from_json(doc)


MANIFEST_DOC = {"metrics": {"losses": [3.0, 2.8, 2.5]}, "published_at": 100.0,
                "articles": [{"title": "<script>alert(1)</script>", "url": "https://en.wikipedia.org/wiki/X",
                              "sha256": "ab"}]}
MANIFEST = RoundManifest.parse(MANIFEST_DOC)


def test_promoted_round_moves_serving_and_counter(tmp_path):
    st = new_state(cfg(tmp_path))
    st2, action = apply_result(st, published(1), MANIFEST, run_spec())
    assert st.round == 0 and st.rounds == ()  # pure: the input is untouched
    assert st2.round == 1 and st2.promoted == "file:///s/local/r000001" and st2.promoted_id == "local/r000001"
    assert action.serve == "file:///s/local/r000001" and action.point_to == "file:///s/local/r000001"
    rec = st2.rounds[0]
    assert rec.promoted and rec.losses == (3.0, 2.8, 2.5) and rec.articles[0].url.startswith("https://")


def test_rejected_round_keeps_serving_and_records_reason(tmp_path):
    st, _ = apply_result(new_state(cfg(tmp_path)), published(1), MANIFEST, run_spec())
    st = st.model_copy(update={"serving": st.promoted})
    st2, action = apply_result(st, published(2, general=(20.0, 40.0)), MANIFEST, run_spec())
    assert action.serve is None and action.point_to is None
    assert st2.promoted == "file:///s/local/r000001" and st2.round == 2
    assert not st2.rounds[-1].promoted and st2.rounds[-1].reason.startswith("rejected: general")
    assert st2.rounds[-1].outcome == "reject"


def test_failed_round_is_retried_under_the_same_number(tmp_path):
    st = new_state(cfg(tmp_path))
    st, action = apply_result(st, result({"status": "failed", "round": 1, "reason": "trainer exited with 1"}), None,
                              run_spec())
    assert st.round == 0 and action.serve is None and next_round(st) == 1
    st, _ = apply_result(st, published(1), MANIFEST, run_spec())
    assert [r.status for r in st.rounds] == ["published"]  # the failed attempt is superseded


def test_empty_round_advances(tmp_path):
    st, action = apply_result(new_state(cfg(tmp_path)), result({"status": "empty", "round": 1, "reason": "empty round"}),
                              None, run_spec())
    assert st.round == 1 and action.serve is None and st.rounds[0].reason == "empty round"


def test_pin_serves_the_pin(tmp_path):
    pin = "file:///s/local/r000001"
    st = new_state(cfg(tmp_path)).model_copy(update={"serving": "file:///s/local/r000002"})
    st, action = apply_result(st, published(3), MANIFEST, run_spec(pinnedCheckpoint=pin))
    assert action.serve == pin and st.promoted == pin and st.rounds[-1].outcome == "pin"
    assert startup_serving(st, run_spec(pinnedCheckpoint=pin).promotion, "file:///s/local/r000002") == pin
    assert startup_serving(st, run_spec().promotion, "file:///s/local/r000002") == "file:///s/local/r000002"


def test_next_round_takes_the_furthest_evidence(tmp_path):
    st = new_state(cfg(tmp_path)).model_copy(update={"round": 3})
    assert next_round(st) == 4
    assert next_round(st, store_last_round=5) == 6
    assert next_round(st, latest_published=7) == 8


def test_the_ids_people_read_follow_the_uris(tmp_path):
    st = new_state(cfg(tmp_path))
    assert st.promoted_id is None and st.serving_id == "base:embedded:smollm2-135m-instruct"
    st = st.model_copy(update={"promoted": "file:///a/b/local/r000003", "serving": "file:///a/b/local/r000003"})
    assert st.promoted_id == st.serving_id == "local/r000003"


def test_every_step_of_a_round_makes_a_new_state_and_leaves_the_old_one(tmp_path):
    """The state is replaced, never edited: each function returns a new state and its input reads
    as it did before (and cannot be assigned to)."""
    pin_spec = run_spec()
    steps = [
        lambda s: state_mod.prepared(s, promoted="file:///s/local/r000001", base_model="m"),
        lambda s: state_mod.round_started(s, 2, now=10.0),
        lambda s: state_mod.trainer_started(s, 4242),
        lambda s: state_mod.progressed(s, RoundProgress(phase="training", step=1, of=4, loss=2.0)),
        lambda s: state_mod.progressed(s, RoundProgress(phase="training", step=2, of=4, loss=1.5)),
        lambda s: state_mod.in_phase(s, "evaluating"),
        lambda s: apply_result(s, published(2), MANIFEST, pin_spec)[0],
        lambda s: state_mod.served(s, "file:///s/local/r000002", now=130.0),
        lambda s: state_mod.timed_publish_to_serve(s),
        lambda s: state_mod.stopped(s),
    ]
    st, _ = apply_result(new_state(cfg(tmp_path)), published(1), MANIFEST, pin_spec)
    for step in steps:
        before = st.model_dump_json()
        new = step(st)
        assert st.model_dump_json() == before and new is not st
        st = new
    assert st.rounds[-1].publish_to_serve_s == 30.0 and st.serving_id == "local/r000002"
    assert st.phase == "stopped" and st.current_round is None and st.round == 2
    with pytest.raises(ValidationError):
        st.round = 7


def test_the_running_round_follows_the_trainers_progress(tmp_path):
    st = state_mod.round_started(new_state(cfg(tmp_path)), 1, now=100.0)
    st = state_mod.trainer_started(st, 4242)
    for step, loss in ((1, 2.5), (1, 2.5), (2, 2.25), (3, float("nan"))):
        st = state_mod.progressed(st, RoundProgress(phase="training", step=step, of=9, loss=loss, eta_s=30.0))
    cur = st.current_round
    assert cur.trainer_pid == 4242 and cur.progress.step == 3 and cur.progress.eta_s == 30.0
    assert cur.losses == (2.5, 2.25)  # one point per step; a NaN loss is no point JSON can hold
    assert state_mod.trainer_started(st, None).current_round.trainer_pid is None


def test_the_progress_file_is_read_as_a_round_progress(tmp_path):
    from selflearn.local.trainer_process import read_progress
    from selflearn.contracts import PhaseStarted, StepDone
    from selflearn.trainer.cli import ProgressFile

    path = tmp_path / "p" / "progress.json"
    pf = ProgressFile(path)
    pf(PhaseStarted("training"))
    pf(StepDone(2, 9, 2.0, lr=1e-4, tokens_per_s=250.0, eta_s=30.0))
    seen, doc = read_progress(path, None)
    assert isinstance(doc, RoundProgress) and doc.phase == "training" and (doc.step, doc.of, doc.eta_s) == (2, 9, 30.0)
    assert read_progress(path, seen) == (seen, None)  # unchanged: nothing new to show
    path.write_text('{"phase": "training", "step": "half')  # a torn write reads as unchanged, not as an error
    assert read_progress(path, None) == (None, None)


def test_state_file_roundtrip_and_guards(tmp_path):
    c = cfg(tmp_path)
    assert load_state(tmp_path, c).round == 0
    save_state(tmp_path / STATE_FILE, new_state(c).model_copy(update={"round": 4}))
    assert load_state(tmp_path, c).round == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    other = RunConfig(name="other", spec=c.spec)
    with pytest.raises(ValueError, match="belongs to run"):
        load_state(tmp_path, other)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_state(tmp_path, c)
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": 1, "run": "local", "rounds": "many"}))
    with pytest.raises(ValueError, match="is malformed: "):
        load_state(tmp_path, c)


def test_the_state_file_is_the_json_the_dashboard_reads(tmp_path):
    """The page (web/index.html) and `selflearn status --json` read these names."""
    c = cfg(tmp_path)
    st, _ = apply_result(new_state(c), published(1), RoundManifest.parse(
        {**MANIFEST_DOC, "metrics": {"losses": [3.0, float("nan"), 2.5]}}), run_spec())
    st = state_mod.progressed(state_mod.round_started(st, 2, now=100.0),
                              RoundProgress(phase="training", step=3, of=18, loss=1.8, tokens_per_s=270, eta_s=55))
    save_state(tmp_path / STATE_FILE, st)
    doc = json.loads((tmp_path / STATE_FILE).read_text())  # strict JSON: no NaN the page could not parse
    assert doc["promoted_id"] == "local/r000001" and doc["serving_id"] == "base:embedded:smollm2-135m-instruct"
    assert doc["phase"] == "training" and doc["round"] == 1
    rec = doc["rounds"][0]
    assert rec["promoted"] is True and rec["outcome"] == "promote" and rec["losses"] == [3.0, 2.5]
    assert rec["ppl"]["general"] == {"before": 20.0, "after": 19.0} and rec["id"] == "local/r000001"
    cur = doc["current_round"]
    assert cur["round"] == 2 and cur["started_at"] == 100.0 and cur["losses"] == [1.8]
    assert {k: cur["progress"][k] for k in ("phase", "step", "of", "loss", "tokens_per_s", "eta_s")} == \
        {"phase": "training", "step": 3, "of": 18, "loss": 1.8, "tokens_per_s": 270, "eta_s": 55}
    assert LocalState.model_validate(doc) == st.model_copy(update={"updated_at": doc["updated_at"]})


def test_a_data_dir_from_before_the_rename_is_read_once_and_moved(tmp_path):
    """`state.json` was local mode's state file's name (the trainer keeps its own `<run>/state.json`
    in the store); an existing data dir keeps its rounds."""
    c = cfg(tmp_path)
    st, _ = apply_result(new_state(c), published(1), MANIFEST, run_spec())
    old = json.loads(st.model_dump_json())
    old.update(promoted_id="local/r000001", trainer_pid=None, current_round=None)  # as the old driver wrote it
    old["rounds"][0].update(knowledge={}, chat={}, losses=[3.0, float("nan")])
    (tmp_path / "state.json").write_text(json.dumps(old))
    from selflearn.local.state_file import read_state

    assert read_state(tmp_path).round == 1  # `selflearn status` on a run not restarted yet
    loaded = load_state(tmp_path, c)
    assert loaded.round == 1 and loaded.promoted_id == "local/r000001" and loaded.rounds[0].losses == (3.0,)
    assert not (tmp_path / "state.json").exists() and (tmp_path / STATE_FILE).exists()
    again = load_state(tmp_path, c)
    assert again.rounds == loaded.rounds and again.round == loaded.round


def test_reconcile_records_checkpoints_published_after_the_last_record(tmp_path):
    c = cfg(tmp_path)
    store = CheckpointStore.from_uri(c.spec.storage.uri)
    src = tmp_path / "w"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x")
    m = {"metrics": published_doc(1)["metrics"] | {"losses": [1.0]}, "articles": [], "parent": None}
    ref = store.publish("local", 1, src, m)
    (tmp_path / "store" / "local" / "r000002").mkdir()
    (tmp_path / "store" / "local" / "r000002" / "model.safetensors").write_bytes(b"half")
    st, action = reconcile(new_state(c), store, c.spec)
    assert st.round == 1 and st.rounds[0].id == ref.id and action.serve == ref.uri
    assert st.rounds[0].losses == (1.0,)  # the loss curve, from the manifest
    assert reconcile(st, store, c.spec)[1] is None  # idempotent
    assert remove_incomplete(store, "local") == ["r000002"]
    assert [r.round for r in store.list("local")] == [1]


def test_status_table_is_plain_text(tmp_path):
    st, _ = apply_result(new_state(cfg(tmp_path)), published(1), MANIFEST, run_spec())
    rec = st.rounds[0].model_copy(update={"reason": "evil\x1b[2Jreason"})
    out = format_table(st.model_copy(update={"rounds": (rec,)}), articles=True)
    assert "promoted" in out and "20.00->19.00" in out and "local/r000001" in out
    assert "\x1b" not in out and "https://en.wikipedia.org/wiki/X" in out


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
    save_state(tmp_path / STATE_FILE, st)
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    assert "local/r000001" in capsys.readouterr().out
    assert main(["status", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["round"] == 1
    assert main(["status", "--data-dir", str(tmp_path / "nope")]) == 2


def test_a_round_record_carries_knowledge_chat_health_and_examples(tmp_path):
    res = published_doc(1)
    res["metrics"].update({"knowledge": {"learned": {"before": 0.2, "after": 0.4},
                                         "held_out": {"before": 0.21, "after": 0.2}},
                           "chat": {"retention": 0.97, "format_ok": {"before": 1.0, "after": 1.0}}})
    manifest = RoundManifest.parse({**MANIFEST_DOC, "probe": {"examples": [
        {"question": "What is Chard?", "parent": "A mushroom.", "candidate": "A leafy vegetable.",
         "parent_score": 0.0, "candidate_score": 1.0}]}})
    st, _ = apply_result(new_state(cfg(tmp_path)), result(res), manifest, run_spec())
    rec = st.rounds[0]
    assert rec.promoted and rec.knowledge.learned.after == 0.4 and rec.chat.retention == 0.97
    out = format_table(st)
    assert "0.20->0.40" in out and "0.970" in out and "100%" in out
    assert "Q: What is Chard?" in out and "candidate (1.00): A leafy vegetable." in out


def test_a_round_record_says_which_feedback_it_learned(tmp_path):
    res = published_doc(1)
    res["metrics"]["feedback"] = {"corrections": 2, "ratings": 8, "pending": 0, "dropped": {"duplicate": 1}}
    manifest = RoundManifest.parse({**MANIFEST_DOC, "feedback": [{"id": "ab12", "kind": "correction"},
                                                                 {"id": "cd34", "kind": "up"}]})
    st, _ = apply_result(new_state(cfg(tmp_path)), result(res), manifest, run_spec())
    assert st.rounds[0].feedback.ids == ("ab12", "cd34") and st.rounds[0].feedback.corrections == 2
    assert "2 fix, 8 rated" in format_table(st)
    res2 = published_doc(2)
    res2["metrics"]["feedback"] = {"error": "feedback store unavailable: EndpointConnectionError",
                                   "corrections": 0, "ratings": 0}
    st, _ = apply_result(st, result(res2), MANIFEST, run_spec())
    assert "unavailable" in format_table(st)
    st, _ = apply_result(st, published(3), MANIFEST, run_spec())  # a run without a feedback source
    assert st.rounds[-1].feedback is None


def test_a_malformed_manifest_is_one_line():
    with pytest.raises(ValueError, match=r"^the manifest is malformed: published_at: "):
        RoundManifest.parse({"published_at": "yesterday"})


def test_status_shows_the_running_round_live(tmp_path):
    st = new_state(cfg(tmp_path)).model_copy(update={"current_round": RunningRound(
        round=3, started_at=100.0,
        progress=RoundProgress(phase="training", step=4, of=18, loss=1.9, tokens_per_s=265, eta_s=52))})
    out = format_table(st, now=130.0)
    assert "training round 3 for 30s: training, step 4/18, loss 1.900, 265 tok/s, ETA 52s" in out


# -- the terminal of `selflearn local` ----------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


def _show_a_round(out, tmp_path):
    from selflearn.local.events import RoundProgressed, RoundRecorded, RoundStarted
    from selflearn.local.terminal import Terminal

    term = Terminal(out)
    term(RoundStarted(1, None))
    term(RoundProgressed(RoundProgress(phase="loading", started_at=0.0, updated_at=3.0)))
    term(RoundProgressed(RoundProgress(phase="training", started_at=0.0, updated_at=12.0)))
    for step in range(1, 19):
        term(RoundProgressed(RoundProgress(phase="training", step=step, of=18, loss=2.0 - step / 100,
                                           tokens_per_s=265.0, eta_s=(18 - step) * 3.0, started_at=0.0,
                                           updated_at=12.0 + step * 3)))
    st, _ = apply_result(new_state(cfg(tmp_path)), published(1), MANIFEST, run_spec())
    term(RoundRecorded(st.rounds[0]))
    return out.getvalue()


def test_the_terminal_shows_the_running_round_as_a_bar(tmp_path):
    text = _show_a_round(_Tty(), tmp_path)
    assert text.startswith("round 1: training from the base model\n")
    assert "loading" in text and "training" in text
    bar = text.split("[0:12] training\n", 1)[1].split("\nround 1: promoted", 1)[0]
    assert bar.startswith("\rtraining: ") and "\n" not in bar  # one line, redrawn in place
    assert "18/18" in bar and "loss 1.820, 265 tok/s, ETA 0:00" in bar
    assert text.rstrip("\n").endswith("round 1: promoted: general ppl 20.00->19.00 (-5.0%, limit +2.0%); "
                                       "fresh ppl 30.00->29.00 (-3.3%, limit +5.0%); skipped: chat and knowledge "
                                       "(training.chatEval is off)")


def test_the_terminal_prints_plain_lines_when_not_a_tty(tmp_path):
    text = _show_a_round(io.StringIO(), tmp_path)
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert lines[0] == "round 1: training from the base model"
    assert lines[1:3] == ["[0:03] loading", "[0:12] training"]
    steps = [x for x in lines if ": step " in x]
    assert 9 <= len(steps) <= 11, steps  # one a tenth of the steps, not one a step
    assert steps[-1] == "[1:06] training: step 18/18 (100%), loss 1.820, 265 tok/s, ETA 0:00"
    assert lines[-1].startswith("round 1: promoted: ")


def test_train_procs_runs_each_round_as_ranks_and_a_failed_rank_reaches_the_record(tmp_path):
    from selflearn.local import trainer_process
    from selflearn.local.trainer_process import TrainerOptions

    args = build_parser().parse_args(["local", "--train-procs", "2", "--data-dir", str(tmp_path)])
    opts = TrainerOptions(nice=0, procs=args.train_procs)
    cmd = trainer_process.trainer_command(opts, tmp_path / "run.yaml", 3, None, tmp_path, tmp_path / "p.json")
    assert cmd[cmd.index("--procs") + 1] == "2"
    assert "--procs" not in trainer_process.trainer_command(TrainerOptions(nice=0), tmp_path / "run.yaml", 3, None,
                                                            tmp_path, tmp_path / "p.json")
    with pytest.raises(ValueError, match="--train-procs must be at least 1"):
        TrainerOptions(procs=0)
    # The launcher's own line, naming the rank, is the record's reason (not the log's last lines).
    said = RoundResult("failed", 3, reason="rank 1 of 2 failed (killed by SIGKILL): no output").to_line()
    log = tmp_path / "round.log"
    log.write_text("Traceback ...\nRuntimeError: Connection closed by peer\n")
    got = trainer_process.read_result(1, f"noise\n{said}\n", log, 3)
    assert got.status == "failed" and got.reason.startswith("rank 1 of 2 failed (killed by SIGKILL)")
    # Without a line, the log's tail says what happened.
    assert "Connection closed by peer" in (trainer_process.read_result(1, "", log, 3).reason or "")
