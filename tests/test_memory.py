"""The memory of learned articles: built from a round's articles on top of its parent's, saved in
the checkpoint, loaded (or rebuilt, or refused) with it, and searched so that a question about a
learned article finds it while small talk and unrelated questions find nothing."""

from __future__ import annotations

import json

import pytest

from selflearn.memory import MEMORY_DIR, Memory, MemoryUnreadable, passages_of, reading_prompt
from selflearn.sources.base import Article
from selflearn.sources.snapshot import load_snapshot
from selflearn.trainer.probe import questions_for

ARTS = load_snapshot("en")[:300]


@pytest.fixture(scope="module")
def memory() -> Memory:
    return Memory.build([], "en").grown(ARTS[:200], "run/r000001").grown(ARTS[200:], "run/r000002")


def test_each_passage_is_whole_sentences_of_one_article_and_names_its_round():
    art = Article(title="T", url="https://x/T", source="snapshot:en", text=" ".join(f"Sentence {i} is here." for i in range(80)))
    ps = passages_of(art, "run/r000004", max_chars=200)
    assert len(ps) > 5 and all(p.title == "T" and p.learned_in == "run/r000004" for p in ps)
    assert all(len(p.text) <= 200 and p.text.endswith(".") for p in ps)
    assert " ".join(p.text for p in ps) == art.text


def test_a_question_about_a_learned_article_finds_it_in_every_phrasing(memory):
    found = wrong = asked = 0
    for i, art in enumerate(ARTS[:60]):
        for q in questions_for(art, phrasings=3, offset=i):
            asked += 1
            hits = memory.search(q.question)
            found += bool(hits)
            wrong += bool(hits) and hits[0].passage.title != art.title
    assert found >= 0.9 * asked and wrong == 0, (found, wrong, asked)


def test_the_passage_names_where_it_was_learned(memory):
    hit = memory.search(questions_for(ARTS[250])[0].question)[0]
    assert hit.passage.title == ARTS[250].title and hit.passage.learned_in == "run/r000002"
    assert hit.passage.url == ARTS[250].url


@pytest.mark.parametrize("text", ["Hello, how are you?", "What is 2+2?", "Thanks!", "ok", "",
                                  "Give me three tips for sleeping better."])
def test_small_talk_reads_nothing(memory, text):
    assert memory.search(text) == []


def test_a_question_about_something_never_learned_mostly_reads_nothing(memory):
    others = load_snapshot("en")[5000:5200]
    matched = sum(bool(memory.search(questions_for(a)[0].question)) for a in others)
    assert matched <= 20, matched  # those that match: a learned title names their subject


def test_saved_and_loaded_it_answers_the_same(memory, tmp_path):
    memory.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / MEMORY_DIR).iterdir()) == ["index", "memory.json", "passages.jsonl"]
    back = Memory.load(tmp_path)
    assert back is not None and back.passages == memory.passages
    q = questions_for(ARTS[10])[0].question
    assert back.search(q) == memory.search(q)


def test_a_checkpoint_from_before_memories_has_none(tmp_path):
    assert Memory.load(tmp_path) is None


def test_an_index_from_another_library_version_is_rebuilt_from_the_passages(memory, tmp_path, caplog):
    memory.save(tmp_path)
    meta = tmp_path / MEMORY_DIR / "memory.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "library_version": "0.0.1"}))
    with caplog.at_level("INFO", logger="selflearn.memory"):
        back = Memory.load(tmp_path)
    assert back is not None and "rebuilding" in caplog.text
    assert back.search(questions_for(ARTS[3])[0].question)[0].passage.title == ARTS[3].title


def test_a_damaged_index_is_rebuilt_and_damaged_passages_refuse_the_memory(memory, tmp_path):
    memory.save(tmp_path)
    for f in (tmp_path / MEMORY_DIR / "index").iterdir():
        f.write_bytes(b"\x00garbage")
    back = Memory.load(tmp_path)
    assert back is not None and back.search(questions_for(ARTS[3])[0].question)
    passages = tmp_path / MEMORY_DIR / "passages.jsonl"
    passages.write_text(passages.read_text()[:-500])  # cut mid-line
    with pytest.raises(MemoryUnreadable, match="cannot be read|passages"):
        Memory.load(tmp_path)
    passages.write_text('{"title": "only one"}\n')
    with pytest.raises(MemoryUnreadable):
        Memory.load(tmp_path)


def test_french_and_spanish_memories_stem_their_own_language():
    for lang in ("fr", "es"):
        arts = load_snapshot(lang)[:50]
        mem = Memory.build([], lang).grown(arts, "run/r000001")
        hits = [mem.search(questions_for(a)[0].question) for a in arts[:20]]
        assert sum(bool(h) and h[0].passage.title == a.title for h, a in zip(hits, arts)) >= 16, lang


def test_the_reading_prompt_puts_the_passages_before_the_question():
    assert reading_prompt("Who was X?", []) == "Who was X?"
    assert reading_prompt("Who was X?", [("X", "X was a king."), ("Y", "Y is a river.")]) == \
        "X: X was a king.\n\nY: Y is a river.\n\nWho was X?"
