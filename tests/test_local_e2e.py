"""`selflearn local` end to end with tiny rounds (real trainer subprocesses, real Ray Serve). The
tests share one run, in order, once per model: a tiny random Llama with the embedded model's
tokenizer and chat template (the fast tier: the driver's logic, rounds of seconds) and the
embedded model itself (the full tier: the same checks on real learning).

1. two rounds while serving -> promoted, /chat answers with the new checkpoint, dashboard lists both;
2. (the embedded model only) a poisoned round (random characters through a files source, higher
   learning rate) is rejected, serving stays, the reason is recorded;
3. a restart resumes at the next round without repeating articles;
4. SIGINT during a round stops cleanly: no trainer left, no incomplete checkpoint, state consistent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from selflearn.checkpoints import CheckpointStore
from selflearn.local.state_file import read_state
from selflearn.spec import RunConfig, parse_spec

from conftest import REPO, free_port

# The driver owns Ray and Serve: this module runs after every test of the shared Serve (conftest).
OWNS_RAY = True
TINY = {"epochs": 1, "batchSize": 2, "gradientAccumulation": 1, "learningRate": 1.0e-4, "maxLength": 64,
        "evalArticles": 2, "generalArticles": 2, "chatEval": False}


def config(run, *, sources=None, **training) -> RunConfig:
    return RunConfig(name="local", spec=parse_spec({
        "baseModel": run.model, "sources": sources or [{"snapshot": {"language": "en", "articlesPerRound": 2}}],
        "training": {**TINY, **training}, "storage": {"uri": run.store}}))


class Run(NamedTuple):
    dir: Path
    store: str
    model: str


EMBEDDED_RUN = pytest.param("embedded_model_dir", id="embedded", marks=pytest.mark.full)


@pytest.fixture(scope="module", params=[pytest.param("tiny_llama_dir", id="tiny-llama"), EMBEDDED_RUN])
def run_dir(request, tmp_path_factory) -> Run:
    model = request.getfixturevalue(request.param)
    d = tmp_path_factory.mktemp("local-run")
    return Run(d, f"file://{d / 'checkpoints'}", "embedded:smollm2-135m-instruct" if request.param ==
               "embedded_model_dir" else model)


@pytest.fixture(scope="module")
def served(run_dir):
    """A driver and a live Serve app on the base model; shut down (Serve and Ray) afterwards."""
    import ray

    from selflearn.local.driver import LocalDriver
    from selflearn.local.serving import start_serving, stop_serving
    from tests.support import serving as testing

    # The driver owns Ray and Serve (port, namespace): retire the serving tests' shared instance.
    testing.stop_shared()
    driver = LocalDriver(config(run_dir), run_dir.dir)
    state = driver.prepare()
    server = start_serving(driver, port=free_port(), serving=state.promoted)
    yield driver, server
    stop_serving(server)
    assert not ray.is_initialized()


def chat(server, message="What is new?"):
    import httpx

    r = httpx.post(f"{server.url}/chat", json={"message": message, "max_length": 8, "temperature": 0}, timeout=120)
    r.raise_for_status()
    return r


def test_two_rounds_promote_and_serve(served):
    import httpx

    driver, server = served
    assert chat(server).json()["checkpoint"].startswith("base")
    state = driver.loop(rounds=2, interval=0)
    assert [r.round for r in state.rounds] == [1, 2]
    assert any(r.promoted for r in state.rounds), [r.reason for r in state.rounds]
    promoted = state.promoted_id
    assert promoted in ("local/r000001", "local/r000002")
    assert driver.store.promoted("local").id == promoted
    r = chat(server)
    assert r.json()["checkpoint"] == promoted and r.headers["X-Model-Checkpoint"] == promoted
    # The dashboard's data and page, on the chat app's own FastAPI.
    data = httpx.get(f"{server.url}/api/rounds", timeout=30).json()
    assert [x["round"] for x in data["rounds"]] == [1, 2] and data["serving_id"] == promoted
    for rec in data["rounds"]:
        assert rec["losses"] and rec["ppl"]["general"]["before"] > 0 and rec["reason"]
        assert rec["articles"] and all(a["url"].startswith("https://") and a["title"] for a in rec["articles"])
    assert any(rec.get("publish_to_serve_s") is not None for rec in data["rounds"])
    page = httpx.get(f"{server.url}/dashboard/", timeout=30)
    assert page.status_code == 200 and "/api/rounds" in page.text and "innerHTML" not in page.text


# On the real model only: a random tiny model's perplexity is no signal a gate can read (noise
# lowers it as often as it raises it, measured).
@pytest.mark.parametrize("run_dir", [EMBEDDED_RUN], indirect=True)
def test_poisoned_round_is_rejected_and_serving_stays(served, run_dir, tmp_path):
    from selflearn.local.driver import LocalDriver

    driver, server = served
    before = driver.state.promoted
    rng = random.Random(0)
    poison = tmp_path / "poison"
    poison.mkdir()
    for i in range(3):
        (poison / f"noise{i}.txt").write_text(
            "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + " ") for _ in range(1000)))
    bad = LocalDriver(config(run_dir, sources=[{"files": {"paths": [str(poison)]}}], learningRate=3e-3), run_dir.dir,
                      server=server)
    bad.prepare()
    state = bad.loop(rounds=1, interval=0)
    rec = state.rounds[-1]
    assert rec.round == 3 and rec.status == "published", rec
    assert not rec.promoted and rec.reason.startswith("rejected: general"), rec.reason
    general = rec.ppl["general"]
    assert general.after > general.before * 1.02
    assert state.promoted == before and bad.store.promoted("local").uri == before
    assert chat(server).json()["checkpoint"] == state.serving_id == before.rsplit("/", 2)[-2] + "/" + \
        before.rsplit("/", 1)[-1]


def test_restart_resumes_without_repeating_articles(run_dir):
    from selflearn.local.driver import LocalDriver

    driver = LocalDriver(config(run_dir), run_dir.dir)  # a fresh process's view: only the files on disk
    state = driver.prepare()
    last = state.round  # 3 after the poisoned round, else 2
    assert last == len(state.rounds) and driver.next_round() == last + 1
    parent = state.promoted
    state = driver.loop(rounds=1, interval=0)
    rec = state.rounds[-1]
    assert rec.round == last + 1 and rec.status == "published" and rec.parent == parent
    earlier = {a.sha256 for r in state.rounds[:-1] for a in r.articles}
    assert rec.articles and not earlier & {a.sha256 for a in rec.articles}
    assert len({r.round for r in state.rounds}) == len(state.rounds) == last + 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigint_during_a_round_leaves_nothing_half_written(run_dir):
    d, store = run_dir.dir, run_dir.store
    cfg_file = d / "sigint.yaml"
    # Epochs enough that no round can end before the signal, even on the tiny model.
    cfg_file.write_text(json.dumps(config(run_dir, epochs=100).model_dump(by_alias=True, mode="json", exclude_none=True)))
    # Debris of an earlier crash mid-upload: a round directory with weights and no manifest.
    before = read_state(d)
    debris = d / "checkpoints" / "local" / f"r{before.round + 1:06d}"
    debris.mkdir(parents=True)
    (debris / "model.safetensors").write_bytes(b"half a model")
    proc = subprocess.Popen([sys.executable, "-m", "selflearn.cli", "local", "--config", str(cfg_file), "--data-dir",
                             str(d), "--no-serve", "--rounds", "3", "--interval", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Until the trainer reports a phase of its own (loading the model is over): mid-round.
        deadline, pid = time.monotonic() + 180, None
        while time.monotonic() < deadline and pid is None:
            time.sleep(0.2)
            running = read_state(d).current_round
            if running is not None and running.progress is not None and running.progress.phase != "starting":
                pid = running.trainer_pid
        assert pid, "the trainer never reached a phase of its round"
        assert not debris.exists()  # cleaned on start
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopping" in out and "round " in out and ": training from " in out  # the terminal's round line
    assert not _alive(pid), "the trainer outlived the driver"
    st = read_state(d)
    assert st.phase == "stopped" and st.current_round is None  # the trainer's pid went with its round
    assert st.round == before.round and st.promoted == before.promoted
    assert st.rounds == before.rounds
    store_obj = CheckpointStore.from_uri(store)
    rounds = [r.round for r in store_obj.list("local")]
    on_disk = sorted(p.name for p in (d / "checkpoints" / "local").iterdir() if p.is_dir())
    assert on_disk == [f"r{n:06d}" for n in rounds], "a round directory without a manifest was left"
    assert max(rounds) == before.round and not (d / "tmp").exists()
    assert (store_obj.get_json("local/state.json") or {}).get("last_round") == before.round
