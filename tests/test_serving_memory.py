"""Serving reads the checkpoint's memory: a question about a learned article is answered with its
passages in front of it and names them as sources (/chat, its stream, the OpenAI route); small talk
reads nothing; memory swaps with the weights; a damaged memory refuses the checkpoint; a checkpoint
from before memories serves without one and says so in /status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from selflearn.checkpoints import CheckpointStore
from selflearn.contracts import Done
from selflearn.memory import MEMORY_DIR, Memory
from selflearn.serving.backend import EngineBackend
from selflearn.serving.config import EngineOptions, ServeSettings
from selflearn.serving.engine import Engine
from selflearn.serving.http.app import build_api
from selflearn.sources.snapshot import load_snapshot
from tests.support.engine import ask, generate, serve_api

ARTS = load_snapshot("en")[:12]


def publish(store_dir: Path, model_dir: str, round_: int, articles, *, memory: bool = True) -> str:
    """A checkpoint of the tiny model under `store_dir` whose memory holds `articles` (learned in it)."""
    src = store_dir.parent / f"src{round_}"
    shutil.copytree(model_dir, src)
    if memory:
        Memory.build([], "en").grown(articles, f"mem/r{round_:06d}").save(src)
    return CheckpointStore.from_uri(f"file://{store_dir}").publish("mem", round_, src, {"base_model": model_dir}).uri


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("memory-serving")
    store = root / "store"
    return {"first": publish(store, tiny_llama_dir, 1, ARTS[:6]),
            "second": publish(store, tiny_llama_dir, 2, ARTS),
            "none": publish(store, tiny_llama_dir, 3, [], memory=False)}


@pytest.fixture(scope="module")
def engine(checkpoints, tiny_llama_dir):
    eng = Engine(EngineOptions(dtype="fp32", torch_threads=1, max_new_tokens_cap=32))
    eng.configure({"checkpoint": checkpoints["first"], "base_model": tiny_llama_dir}, wait=True)
    yield eng
    eng.shutdown()


def question(art) -> str:
    return f"What should I know about {art.title}?"


def test_an_answer_about_a_learned_article_names_it_and_small_talk_names_nothing(engine):
    done = generate(engine, ask(question(ARTS[2]), max_new_tokens=4))
    assert isinstance(done, Done) and [s.title for s in done.sources] == [ARTS[2].title]
    assert done.sources[0].url == ARTS[2].url and done.sources[0].checkpoint == "mem/r000001"
    # The passage was read: the prompt is the question plus the passage.
    bare = generate(engine, ask(question(ARTS[2]), max_new_tokens=4, memory=False))
    assert bare.sources == () and done.usage["prompt_tokens"] > bare.usage["prompt_tokens"] + 40
    assert generate(engine, ask("Hello! How are you today?", max_new_tokens=4)).sources == ()
    # Not learned by this checkpoint (round 2 learned it): nothing to read.
    assert generate(engine, ask(question(ARTS[9]), max_new_tokens=4)).sources == ()


def test_the_memory_swaps_with_the_weights_and_a_checkpoint_without_one_says_so(engine, checkpoints, tiny_llama_dir):
    engine.configure({"checkpoint": checkpoints["second"], "base_model": tiny_llama_dir}, wait=True)
    try:
        w = engine.status().weights
        assert w.checkpoint == "mem/r000002" and w.memory_passages and w.memory_passages >= len(ARTS)
        done = generate(engine, ask(question(ARTS[9]), max_new_tokens=4))
        assert [(s.title, s.checkpoint) for s in done.sources] == [(ARTS[9].title, "mem/r000002")]
        engine.configure({"checkpoint": checkpoints["none"], "base_model": tiny_llama_dir}, wait=True)
        assert engine.status().weights.memory_passages is None  # from before memories: serves without
        assert generate(engine, ask(question(ARTS[9]), max_new_tokens=4)).sources == ()
        # The deployment may turn memory off without a reload.
        engine.configure({"checkpoint": checkpoints["second"], "base_model": tiny_llama_dir,
                          "memory": {"enabled": False}}, wait=True)
        assert generate(engine, ask(question(ARTS[9]), max_new_tokens=4)).sources == ()
    finally:
        engine.configure({"checkpoint": checkpoints["first"], "base_model": tiny_llama_dir}, wait=True)


def test_a_damaged_memory_refuses_the_checkpoint_like_damaged_weights(tmp_path, tiny_llama_dir, checkpoints):
    uri = publish(tmp_path / "store", tiny_llama_dir, 1, ARTS[:3])
    passages = tmp_path / "store" / "mem" / "r000001" / MEMORY_DIR / "passages.jsonl"
    passages.write_text(passages.read_text().replace("a", "b", 1))  # one byte: its sha256 no longer matches
    eng = Engine(EngineOptions(dtype="fp32", torch_threads=1, max_new_tokens_cap=8))
    try:
        eng.configure({"checkpoint": checkpoints["first"], "base_model": tiny_llama_dir}, wait=True)
        eng.configure({"checkpoint": uri, "base_model": tiny_llama_dir}, wait=True)
        st = eng.status()
        assert st.weights.checkpoint == "mem/r000001" and st.weights.checkpoint_uri == checkpoints["first"]
        assert st.weights.degraded and "sha256" in (st.counters.last_swap_error or "")
    finally:
        eng.shutdown()


def test_the_http_routes_show_the_sources(engine):
    with serve_api(build_api(EngineBackend(engine), ServeSettings())) as url, httpx.Client(base_url=url,
                                                                                           timeout=60) as c:
        body = c.post("/chat", json={"message": question(ARTS[1]), "max_length": 4}).json()
        assert body["sources"] == [{"title": ARTS[1].title, "url": ARTS[1].url, "checkpoint": "mem/r000001"}]
        assert c.post("/chat", json={"message": "Thanks!", "max_length": 4}).json()["sources"] == []
        assert c.post("/chat", json={"message": question(ARTS[1]), "max_length": 4,
                                     "memory": False}).json()["sources"] == []
        events = [json.loads(line[len("data: "):]) for line in
                  c.post("/chat/stream", json={"message": question(ARTS[1]), "max_length": 4}).text.splitlines()
                  if line.startswith("data: ")]
        assert events[0]["sources"][0]["title"] == ARTS[1].title and events[-1]["sources"] == events[0]["sources"]
        oa = c.post("/v1/chat/completions", json={"model": "selflearn", "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": question(ARTS[1])}]})
        assert oa.status_code == 200 and oa.json()["sources"][0]["checkpoint"] == "mem/r000001"
        status = c.get("/status").json()
        assert status["model"]["memory_passages"] >= 6


def test_the_chat_page_links_the_sources_an_answer_read(engine, page, tmp_path):
    """In real Chromium: the answer's meta line links the article it read, titled with the
    checkpoint that learned it; a source whose url is not http(s) is shown as text, never a link."""
    from playwright.sync_api import expect

    with serve_api(build_api(EngineBackend(engine), ServeSettings())) as url:
        page.goto(url + "/")
        page.fill("#max_length", "4")
        page.fill("#message", question(ARTS[4]))
        page.click("#send")
        link = page.locator(".msg.assistant .meta .sources a").last
        expect(link).to_have_text(ARTS[4].title, timeout=60_000)
        assert link.get_attribute("href") == ARTS[4].url and link.get_attribute("title") == "learned in mem/r000001"
        assert link.get_attribute("rel") == "noopener noreferrer"
        page.fill("#message", "Thanks, that is all.")
        page.click("#send")
        expect(page.locator(".msg.assistant .meta")).to_have_count(2, timeout=60_000)
        assert page.locator(".msg.assistant").last.locator(".sources").count() == 0
        # A hostile url in a memory stays text.
        page.evaluate("""() => { const d = document.createElement('div'); d.className = 'msg assistant probe';
            document.getElementById('log').append(d);
            addMeta(d, {checkpoint: 'x', sources: [{title: 'evil', url: 'javascript:alert(1)', checkpoint: 'x'}]}); }""")
        assert page.locator(".probe .sources a").count() == 0 and page.locator(".probe .sources span").count() == 1
