"""Learning in the form people ask: question/answer pairs, chat examples with the loss on the
answer only, packing that never cuts an example, and the scores the gate reads."""

from __future__ import annotations

import logging

import pytest
import torch

from selflearn import basemodel
from selflearn.prompting import IGNORE, PLAIN_STOP, render_example, render_prompt
from selflearn.sources.base import Article
from selflearn.sources.snapshot import GENERAL_POOL, load_snapshot
from selflearn.spec import parse_spec
from selflearn.trainer import data, knowledge, probe
from selflearn.trainer.loss import causal_lm_loss
from selflearn.trainer.qa import make_pairs, split_sentences

KNUTH = Article(
    title="Donald Knuth", source="snapshot:en",
    text=("Donald Ervin Knuth is an American computer scientist and mathematician. He is a professor emeritus at "
          "Stanford University. He is the 1974 recipient of the ACM Turing Award, informally considered the Nobel "
          "Prize of computer science."),
    extra={"topic": "People", "description": "American computer scientist and mathematician (born 1938)"})


@pytest.fixture(scope="module")
def tok():
    return basemodel.load_tokenizer(basemodel.resolve("embedded:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def plain_tok():
    t = basemodel.load_tokenizer(basemodel.resolve("embedded:smollm2-135m-instruct"))
    t.chat_template = None  # what OPT and other base models look like
    return t


# -- pairs -----------------------------------------------------------------------------------------
def test_pairs_are_deterministic_grounded_and_varied():
    pairs = make_pairs(KNUTH, per_article=6)
    assert pairs == make_pairs(KNUTH, per_article=6)
    sentences = set(split_sentences(KNUTH.text))
    for p in pairs:
        assert set(split_sentences(p.answer)) <= sentences, f"{p.kind} answer is not the article's own: {p.answer}"
    questions = [p.question for p in pairs]
    assert questions[0] == "Who is Donald Knuth?" and pairs[0].answer.startswith("Donald Ervin Knuth is")
    assert "Tell me about Donald Knuth." in questions
    assert any("1974" in q for q in questions), "a year in the text becomes a when-question"
    assert any("Stanford University" in q for q in questions), "a name in the text becomes a question"
    covered = {s for p in pairs for s in split_sentences(p.answer)}
    assert covered == sentences, "the pairs cover every fact, not only the first sentence"
    assert len(make_pairs(KNUTH, per_article=2)) == 2


def test_pairs_for_a_past_person_and_a_thing():
    foucault = Article(title="Léon Foucault", source="snapshot:en",
                       text="Jean Bernard Léon Foucault was a French physicist. He invented the Foucault pendulum.",
                       extra={"topic": "People", "description": "French physicist (1819–1868)"})
    assert make_pairs(foucault)[0].question == "Who was Léon Foucault?"
    chard = Article(title="Chard", source="snapshot:en", text="Chard is a green leafy vegetable. It is also "
                    "called silver beet.", extra={"topic": "Biology", "description": "Green leafy vegetable"})
    assert make_pairs(chard)[0].question == "What is Chard?"


@pytest.mark.parametrize("lang,words", [("en", ("What", "Who", "Tell me")), ("fr", ("Qu", "Qui", "Parle-moi")),
                                        ("es", ("¿Qué", "¿Quién", "Háblame"))])
def test_pairs_in_every_shipped_language(lang, words):
    arts = load_snapshot(lang)[GENERAL_POOL:GENERAL_POOL + 30]
    pairs = [p for a in arts for p in make_pairs(a)]
    assert len(pairs) >= 60, "several pairs per article"
    assert all(any(p.question.startswith(w) for w in words) for p in pairs if p.kind in ("define", "summary"))
    for a in arts:
        sentences = set(split_sentences(a.text))
        assert all(set(split_sentences(p.answer)) <= sentences for p in make_pairs(a))


def test_a_language_without_templates_trains_as_text_only(tok, caplog):
    de = Article(title="Berlin", source="wikipedia:de", text="Berlin ist die Hauptstadt Deutschlands. " * 3)
    assert make_pairs(de) == []
    with caplog.at_level(logging.INFO, logger="selflearn.trainer"):
        chat = knowledge.build_chat_data(tok, [de, KNUTH], per_article=3)
    assert chat.text_only == ["Berlin"] and len(chat.pairs) == 3
    assert "no question templates for language(s) ['de']" in caplog.text


def test_unknown_training_format_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"training.format: Input should be 'text', 'chat' or 'mixed'"):
        parse_spec({"training": {"format": "qa"}})
    assert parse_spec({}).training.format == "mixed"


# -- chat examples -----------------------------------------------------------------------------------
def test_chat_example_renders_like_the_chat_and_masks_the_prompt(tok):
    msgs = [{"role": "user", "content": "Who is Donald Knuth?"}]
    ids, labels = render_example(tok, msgs, "Donald Ervin Knuth is an American computer scientist.")
    prompt = render_prompt(tok, msgs)
    assert ids[:len(prompt)] == prompt, "training sees exactly the prompt serving renders"
    assert labels[:len(prompt)] == [IGNORE] * len(prompt), "prompt tokens carry no loss"
    answer = tok.decode([t for t in labels if t != IGNORE])
    assert answer.startswith("Donald Ervin Knuth") and answer.endswith("<|im_end|>"), "the answer ends its turn"


def test_plain_format_without_a_chat_template(plain_tok):
    ids, labels = render_example(plain_tok, [{"role": "user", "content": "What is Chard?"}], "Chard is a vegetable.")
    text = plain_tok.decode(ids)
    assert "User: What is Chard?\nAssistant: Chard is a vegetable." in text and text.endswith(PLAIN_STOP)
    assert plain_tok.decode([t for t in labels if t != IGNORE]) == " Chard is a vegetable." + PLAIN_STOP


def test_packing_never_cuts_an_example_and_puts_text_after_it(tok):
    examples = [render_example(tok, [{"role": "user", "content": f"Question {i}?"}], "An answer. " * (i + 1))
                for i in range(7)]
    text = [list(range(48000, 48300))]
    assert not any(48000 <= t < 48300 for ids, _ in examples for t in ids), "text ids tell apart from examples"
    blocks = data.pack_examples(examples, text, 128, tok.eos_token_id)
    assert all(len(i) == 128 and len(l) == 128 for i, l in blocks)
    flat = [tuple(i.tolist()) for i, _ in blocks]
    for ex_ids, _ in examples:
        assert any(_contains(b, ex_ids) for b in flat), "every example sits whole inside one block"
    for ids, labels in blocks:
        row = ids.tolist()
        text_at = next((k for k, t in enumerate(row) if 48000 <= t < 48300), None)
        if text_at is not None:
            assert not any(t == 1 for t in row[text_at:]), "no chat example after the text in a block"
    streamed = [t for ids, _ in blocks for t in ids.tolist() if 48000 <= t < 48300]
    assert streamed == list(range(48000, 48300)), "all of the text is trained, once, in order"


def _contains(hay: tuple, needle: list) -> bool:
    n = len(needle)
    return any(list(hay[i:i + n]) == needle for i in range(len(hay) - n + 1))


def test_loss_is_on_the_answer_only(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    ex = render_example(tok, [{"role": "user", "content": "Who is Donald Knuth?"}], "A computer scientist.")
    (ids, labels), = data.pack_examples([ex], [], 64, tok.eos_token_id)
    ids, labels = ids[None], labels[None]
    fused = causal_lm_loss(model, ids, labels=labels, fused=True)
    plain = causal_lm_loss(model, ids, labels=labels, fused=False)
    assert torch.allclose(fused, plain, atol=1e-5), "the fused loss masks exactly like cross-entropy"
    # Another question with the same answer: the same loss (the prompt's targets count for nothing),
    # but not the same as training on every token.
    other = ids.clone()
    k = int((labels[0] == IGNORE).sum()) - 3
    other[0, 2:k] = tok.eos_token_id
    lab2 = labels.clone()
    assert causal_lm_loss(model, other, labels=lab2, fused=True) != causal_lm_loss(model, ids, fused=True)
    fused.backward()
    assert model.lm_head.weight.grad is not None


# -- scores --------------------------------------------------------------------------------------------
def test_knowledge_score_rewards_the_right_answer_not_the_echo():
    ref = split_sentences(KNUTH.text)[0]
    right = "Donald Ervin Knuth is an American computer scientist and mathematician, known for TAOCP."
    wrong = "Donald Knuth is a Canadian poet and novelist."
    echo = "Donald Knuth is Donald Knuth."
    s_right, s_wrong, s_echo = (probe.knowledge_score(a, ref, "Donald Knuth") for a in (right, wrong, echo))
    assert s_right > 0.8 and s_wrong < 0.3 and s_echo == 0
    facts = probe.facts_of("He won the 1974 Turing Award at Stanford.", "Donald Knuth")
    assert {"1974", "turing", "award", "stanford"} <= facts


def test_format_health_catches_loops_drift_and_no_end():
    assert probe.format_health("Hello! How can I help?", [1, 2, 3], ended=True).ok
    assert not probe.format_health("Hi", [1], ended=False).ok
    loop = probe.format_health("la " * 40, [5, 6] * 20, ended=True)
    assert loop.looping and not loop.ok
    drift = probe.format_health("Hi! is a 2004 single by a band (born 1970) and", list(range(30)), ended=True)
    assert drift.drift and not drift.ok


def test_retention_is_parents_reference_perplexity_over_the_candidates():
    assert probe.retention(2.0, 2.0) == 1.0
    assert probe.retention(2.0, 4.0) == 0.5
    assert probe.retention(2.0, float("inf")) == 0.0 and probe.retention(None, 2.0) is None


def test_shipped_chat_references_are_complete():
    for path in (probe.RETENTION_FILE, probe.REPLAY_FILE):
        doc = probe.chat_references(path)
        assert doc["model"] == "embedded:smollm2-135m-instruct"
        assert all(it["prompt"] and it["answer"].strip() for it in doc["items"])
        cats = {it["category"] for it in doc["items"]}
        assert cats == {"greeting", "instruction", "question", "format", "refusal"}
        # What a chatbot must keep doing on a harmful ask is written, never a recorded compliance.
        assert all(it.get("written") for it in doc["items"] if it["category"] == "refusal")
    retention = {it["prompt"] for it in probe.chat_references(probe.RETENTION_FILE)["items"]}
    replay = {it["prompt"] for it in probe.chat_references(probe.REPLAY_FILE)["items"]}
    assert not retention & replay, "the gate never measures on what training replays"


def test_a_stored_probe_of_the_wrong_shape_is_measured_afresh():
    assert knowledge.KnownProbe.parse({"fingerprint": "x", "general": "nope"}) is None
    assert knowledge.KnownProbe.parse(["not", "a", "dict"]) is None
    assert knowledge.KnownProbe.parse({"fingerprint": "x", "general": [{"score": "high"}], "format_failures": []}) \
        is None
    known = knowledge.KnownProbe.parse({"fingerprint": "x", "general": [{"score": 0.5}], "chat_ppl": 2.0,
                                        "format_ok": 1.0, "format_failures": []})
    assert known is not None and known.general == [{"score": 0.5}] and known.chat_ppl == 2.0


def test_replay_covers_every_kind_of_chat_and_earlier_articles_are_asked_again(tok):
    replay = probe.chat_references(probe.REPLAY_FILE)["items"]
    chat = knowledge.build_chat_data(tok, [KNUTH], per_article=2, replay=knowledge.Replay(replay, 10, 1),
                                     review=[Article(title="Chard", source="snapshot:en",
                                                     text="Chard is a green leafy vegetable. It is also called "
                                                          "silver beet.")])
    assert chat.replayed == 10 and chat.reviewed == 1 and len(chat.examples) == 2 + 1 + 10
    texts = [tok.decode(ids) for ids, _ in chat.examples]
    assert any("What is Chard?" in t for t in texts), "an earlier round's article is asked about again"
    replayed = texts[3:]
    cats = {it["category"] for it in replay for t in replayed if it["prompt"] in t}
    assert cats == {"greeting", "instruction", "question", "format", "refusal"}
    # The next round replays other answers.
    later = knowledge.build_chat_data(tok, [KNUTH], per_article=2, replay=knowledge.Replay(replay, 10, 2))
    assert [tok.decode(i) for i, _ in later.examples[2:]] != replayed


def test_greedy_probe_answers_are_what_generate_gives(tok):
    """The probe's decoder drops finished rows from the batch; the answers stay model.generate's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    prompts = ["Hi!", "What is the capital of Italy?", "List three fruits as a bulleted list, please, now."]
    rows = [render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    # Make a few tokens "end the turn" so that rows finish at different steps.
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[:, width:].tolist()
    stops = {ref[0][3], ref[1][7]}
    with torch.inference_mode():
        got = probe._greedy(model, ids, mask, 12, stops)
    for want, have in zip(ref, got):
        cut = next((j + 1 for j, t in enumerate(want) if t in stops), len(want))
        assert have == want[:cut]
    assert len(got[0]) <= 4 and len(got[1]) <= 8, "finished rows stop"


def test_a_share_of_pairs_is_asked_after_passages_the_answer_in_one_or_not_at_all(embedded_model_dir):
    """RAFT-style reading: the chosen pairs' prompts hold the answer's own passage beside another
    article's, or (one time in five) the other article's alone; each example fits the block."""
    from selflearn import basemodel
    from selflearn.sources.snapshot import load_snapshot
    from selflearn.trainer import knowledge
    from selflearn.trainer.reading import Reading

    tok = basemodel.load_tokenizer(embedded_model_dir)
    arts = list(load_snapshot("en")[:12])
    plain = knowledge.build_chat_data(tok, arts, per_article=2)
    read = knowledge.build_chat_data(tok, arts, per_article=2, reading=Reading(0.5, 256, seed=3))
    assert plain.read == 0 and 0.3 * len(read.pairs) <= read.read <= 0.7 * len(read.pairs)
    assert len(read.examples) == len(plain.examples) and all(len(ids) <= 256 for ids, _ in read.examples[:read.read])
    prompts = [tok.decode(ids) for (ids, labels), p in zip(read.examples, read.pairs)]
    with_own = without_own = 0
    for text, pair in zip(prompts, read.pairs):
        asked = text[:text.rindex(pair.question)]
        if ": " not in asked.split("user", 1)[-1]:
            continue  # asked plainly
        others = [a.title for a in arts if a.title != pair.title and f"{a.title}: " in asked]
        assert others, text  # every reading prompt holds another article's passage
        with_own += f"{pair.title}: " in asked
        without_own += f"{pair.title}: " not in asked
    assert with_own > 0 and without_own > 0
    # The answers are the same: only what is read before the question changed.
    assert [p.answer for p in read.pairs] == [p.answer for p in plain.pairs]
