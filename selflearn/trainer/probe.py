"""What a chat user would notice, measured on generated answers: knowledge and chat manners.

* Knowledge: ask about an article in phrasings training never uses (`qa.PROBE_TEMPLATES`: "What
  should I know about <title>?", ...; greedy, through the chat prompt serving uses) and score the
  answer against the article's first sentence: the share of its content words the answer contains
  and the share of its exact facts (years, numbers, names) it repeats, averaged. The title's own
  words do not count: echoing the question is not knowing the answer. Where the first sentence
  allows, also ask back from its fact to the subject ("Who or what was a Central American
  politician who ...?"), scored on the title's words. Open book: the same question with the
  article's lead in the prompt, the ceiling of what the model makes of facts it can read.
* Chat retention: a fixed set of chat prompts (selflearn/data/chat_retention.json) with reference
  answers recorded from the base model. Per model: the perplexity of those references (a model
  that still answers like an assistant keeps it low) and the format health of its own greedy
  answers (ends its turn within the budget, no repetition loop, no encyclopedia continuation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from ..memory import Memory, reading_prompt
from ..prompting import PLAIN_STOP, end_of_turn_ids, has_chat_template, render_example, render_prompt
from ..sources.base import Article
from ..spec import MemoryUseSpec
from . import data, distributed
from .distributed import SOLO, World
from .qa import language_of, probe_templates_for, reverse_question, split_sentences, templates_for

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
RETENTION_FILE = DATA_DIR / "chat_retention.json"
REPLAY_FILE = DATA_DIR / "chat_replay.json"

STOPWORDS = {
    "en": set("""a an the and or but if of in on at to for from by with without as is are was were be been being
        it its it's this that these those he she they them his her their which who whom whose what when where
        why how also not no than then there here into onto over under about after before between during
        such other some any each many most more much can could may might will would shall should do does did
        has have had one two first known called often usually very""".split()),
    "fr": set("""le la les l un une des du de d et ou mais si en dans sur au aux à a pour par avec sans est sont
        était étaient fut été être ce cet cette ces il elle ils elles leur leurs son sa ses qui que quoi dont
        où quand comment aussi ne pas plus moins se s qu y ainsi comme entre après avant pendant lors""".split()),
    "es": set("""el la los las lo un una unos unas de del y o pero si en sobre a al para por con sin es son era
        eran fue fueron ser sido este esta estos estas ese esa su sus que quien cual cuando donde como
        también no más menos se le les entre tras durante ante hasta desde""".split()),
}
_WORD = re.compile(r"[\wÀ-ÿ]+(?:['’][\wÀ-ÿ]+)?")
_NUMBER = re.compile(r"\b\d[\d,.]*\b")
_WIKI_DRIFT = re.compile(r"\(born |\(\d{3,4}\s*[–-]|^\s*==|\n==|\bReferences\b|\bExternal links\b|<\|im_start\|>"
                         r"|^\s*(User|Assistant):", re.M)


# -- scoring (pure) ------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def facts_of(reference: str, title: str) -> set[str]:
    """Exact facts a correct answer repeats: numbers and years, and capitalised names (not the
    first word of the sentence, not words of the title)."""
    title_words = set(_words(title))
    facts = {n.strip(".,") for n in _NUMBER.findall(reference)}
    tokens = reference.split()
    for i, raw in enumerate(tokens):
        w = raw.strip(",.;:()\"“”«»")
        if i > 0 and w[:1].isupper() and w.lower() not in title_words and not w.isupper():
            facts.add(w.lower())
    return {f for f in facts if f}


def knowledge_score(answer: str, reference: str, title: str, language: str = "en") -> float:
    """In [0, 1]: content-word recall of `reference` in `answer`, averaged with exact-fact recall."""
    stop = STOPWORDS.get(language.split("-")[0], STOPWORDS["en"])
    title_words = set(_words(title))
    ref = {w for w in _words(reference) if w not in stop and w not in title_words and len(w) > 1}
    got = set(_words(answer))
    if not ref:
        return 0.0
    recall = len(ref & got) / len(ref)
    facts = facts_of(reference, title)
    if not facts:
        return recall
    fact_recall = sum(1 for f in facts if f in got or f in answer.lower()) / len(facts)
    return (recall + fact_recall) / 2


@dataclass(frozen=True)
class Health:
    ended: bool
    looping: bool
    drift: bool

    @property
    def ok(self) -> bool:
        return self.ended and not self.looping and not self.drift


def format_health(answer: str, token_ids: Sequence[int], ended: bool) -> Health:
    """An answer ends its turn, does not loop (half its trigrams repeated) and does not drift into
    an encyclopedia article or a new turn."""
    looping = False
    if len(token_ids) >= 24:
        grams = [tuple(token_ids[i:i + 3]) for i in range(len(token_ids) - 2)]
        looping = len(set(grams)) / len(grams) < 0.5
    return Health(ended=ended, looping=looping, drift=bool(_WIKI_DRIFT.search(answer)))


# -- the probe sets --------------------------------------------------------------------------------
OPEN_BOOK_CHARS = 1200  # of the article shown with an open-book question (its lead, where the facts are)


@dataclass(frozen=True)
class Question:
    title: str
    question: str
    reference: str  # what a good answer contains: the first sentence ("ask"), the title ("reverse")
    language: str
    kind: str = "ask"  # ask: about the subject | reverse: from the first fact back to the subject
    # (title, text) read before the question: the article's lead (open book) or what the memory found.
    context: tuple[tuple[str, str], ...] | None = None

    @property
    def prompt(self) -> str:
        """The user's message: the question, after what it reads (as serving puts it)."""
        return reading_prompt(self.question, self.context or ())

    def score(self, answer: str) -> float:
        if self.kind == "reverse":
            return title_score(answer, self.title, self.language)
        return knowledge_score(answer, self.reference, self.title, self.language)


def title_score(answer: str, title: str, language: str = "en") -> float:
    """In [0, 1]: the share of the title's words (a parenthesis left out, stopwords too) in `answer`."""
    stop = STOPWORDS.get(language.split("-")[0], STOPWORDS["en"])
    bare = re.sub(r"\s*\([^)]*\)$", "", title)
    want = {w for w in _words(bare) if w not in stop} or set(_words(bare))
    return len(want & set(_words(answer))) / len(want) if want else 0.0


def questions_for(article: Article, *, phrasings: int = 1, offset: int = 0, reverse: bool = True) -> list[Question]:
    """The probe's questions about `article`: `phrasings` of the probe-only forms (starting at form
    `offset`, so a set of articles asked one form each covers every form) and, where the first
    sentence supports it, the reverse question. None of them is a form training uses
    (`qa.PROBE_TEMPLATES`). [] for a language without templates."""
    lang = language_of(article)
    forms = probe_templates_for(lang)
    sentences = split_sentences(article.text)
    if forms is None or templates_for(lang) is None or not sentences:
        return []
    first = sentences[0]
    n = len(forms.asks)
    out = [Question(article.title, forms.asks[(offset + i) % n].format(t=article.title), first, lang)
           for i in range(min(phrasings, n))]
    back = reverse_question(article, first, lang) if reverse else None
    if back:
        out.append(Question(article.title, back, article.title, lang, kind="reverse"))
    return out


def open_book(question: Question, article: Article) -> Question:
    """The same question with the article's lead in front of it: what the model makes of the facts
    when it can read them (the ceiling its memory could reach)."""
    lead = " ".join(article.text.split())[:OPEN_BOOK_CHARS]
    return dataclasses.replace(question, context=((article.title, lead),))


def with_memory(question: Question, memory: Memory | None, use: MemoryUseSpec) -> Question:
    """The question as serving would ask it of a checkpoint with `memory`: after the passages its
    search finds (none found, or no memory: the question alone)."""
    hits = memory.search(question.question, k=use.passages, threshold=use.threshold) if memory else []
    return dataclasses.replace(question, context=tuple((h.passage.title, h.passage.text) for h in hits) or None)


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError(f"{path} is not a chat reference file (no 'items' list)")
    return doc


def chat_references(path: Path = RETENTION_FILE) -> dict[str, Any]:
    """{model, settings, items: [{prompt, category, answer, ended}]}: the shipped references."""
    return _load(str(path))


# -- running a model -------------------------------------------------------------------------------
@dataclass
class Generation:
    text: str
    ids: list[int]
    ended: bool


@torch.inference_mode()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = 32, world: World = SOLO) -> list[Generation]:
    """Greedy answers to single-turn `prompts`, rendered exactly as the chat renders them.

    Left-padded batches: on a CPU a decode step of 21 rows costs 1.6x one of 8 (130 vs 80 ms
    here), so few big batches. In bf16 a greedy answer can depend on its batch's padding, so a set
    whose answers are compared with recorded ones is generated whole, in the order it was recorded
    in. Without a chat template an answer ends where the plain transcript's next `User:` begins.
    With several ranks (`world`, every rank calling with the same prompts) each generates whole
    batches of its share, so every answer comes from the batch it would have had in one process.
    """
    if world.distributed:
        starts = list(range(0, len(prompts), batch_size))
        mine = {i: generate(model, tokenizer, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                            batch_size=batch_size) for i in distributed.shard(world, starts)[0]}
        return [g for _, gens in sorted(distributed.gathered(world, mine).items()) for g in gens]
    plain = not has_chat_template(tokenizer)
    device = next(model.parameters()).device
    stops = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    was_training = model.training
    model.eval()
    out: list[Generation] = []
    for i in range(0, len(prompts), batch_size):
        rows = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        rows_out = _greedy(model, ids, mask, max_new_tokens, set(stops))
        for row in rows_out:
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            kept = row if cut is None else row[:cut]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            if plain and PLAIN_STOP in text:
                text, cut = text[:text.index(PLAIN_STOP)], len(kept)
            out.append(Generation(text.strip(), kept, cut is not None))
    if was_training:
        model.train()
    return out


def _greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
            stops: set[int]) -> list[list[int]]:
    """Greedy decoding of left-padded rows; a row leaves the batch once it ends its turn.

    What `model.generate(do_sample=False)` computes, without carrying finished rows to the end:
    answers differ in length (5 tokens to the whole budget), and on a CPU a decode step's cost
    grows with its rows (~50 ms + 4 ms a row here), so the tail of a batch runs on few rows.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1)
    alive = list(range(ids.shape[0]))  # which input row each batch row is
    last = pos[:, -1]
    results: list[list[int]] = [[] for _ in alive]
    for step in range(max_new_tokens):
        keep = []
        for i, (row, t) in enumerate(zip(alive, nxt.tolist())):
            results[row].append(t)
            if t not in stops:
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(idx)
            alive, nxt, mask, last = [alive[i] for i in keep], nxt[idx], mask[idx], last[idx]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=cache,
                    use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
    return results


def reference_batches(tokenizer: Any, items: Sequence[dict[str, Any]], block: int, batch_size: int = 8):
    """Teacher-forced batches of the reference answers, loss on the answers only."""
    examples = [render_example(tokenizer, [{"role": "user", "content": it["prompt"]}], it["answer"]) for it in items]
    blocks = data.pack_examples(examples, [], block, tokenizer.eos_token_id)
    return data.batches(blocks, batch_size)


def ask(model: torch.nn.Module, tokenizer: Any, questions: Sequence[Question], *,
        max_new_tokens: int = 64, world: World = SOLO) -> list[dict[str, Any]]:
    """Greedy answers to `questions`, each with its knowledge score."""
    if not questions:
        return []
    gens = generate(model, tokenizer, [q.prompt for q in questions], max_new_tokens=max_new_tokens, world=world)
    return [{"title": q.title, "question": q.question, "kind": q.kind, "read": [title for title, _ in q.context or ()],
             "answer": g.text, "score": round(q.score(g.text), 4)}
            for q, g in zip(questions, gens)]


def perplexity_of_references(model: torch.nn.Module, tokenizer: Any, items: Sequence[dict[str, Any]], *,
                              block: int, precision: str = "fp32", world: World = SOLO) -> float | None:
    """Perplexity of the reference answers (their tokens only) after their prompts."""
    from .loop import perplexity

    return perplexity(model, reference_batches(tokenizer, items, block), precision, world) if items else None


def format_check(model: torch.nn.Module, tokenizer: Any, items: Sequence[dict[str, Any]], *,
                 max_new_tokens: int = 128, world: World = SOLO) -> tuple[float | None, list[dict[str, Any]]]:
    """-> (share of greedy answers in good format, the failures with their reasons).

    Only prompts whose recorded base answer ended within the budget count (`ended`): a 135M model
    does not finish every answer, and a check it fails itself tells nothing about a candidate.
    Harmful asks do not count either: there the base model's own answer is no standard (their
    written refusals are measured by the reference perplexity instead).
    All prompts are generated, as recorded, so that the counted ones are generated alike.
    """
    counted = [i for i, it in enumerate(items) if it.get("ended") and it.get("category") != "refusal"]
    if not counted:
        return None, []
    gens = generate(model, tokenizer, [it["prompt"] for it in items], max_new_tokens=max_new_tokens, world=world)
    failures = []
    for it, g in ((items[i], gens[i]) for i in counted):
        h = format_health(g.text, g.ids, g.ended)
        if not h.ok:
            failures.append({"prompt": it["prompt"], "answer": g.text[:300],
                             "why": [k for k, bad in (("no end of turn", not h.ended), ("repetition loop", h.looping),
                                                      ("encyclopedia drift", h.drift)) if bad]})
    return 1 - len(failures) / len(counted), failures


def retention(parent_ppl: float | None, candidate_ppl: float | None) -> float | None:
    """Chat retention: the parent's reference perplexity over the candidate's. 1: answers as likely
    as before; below: drifting away from them; above: closer to the base model's manners (the
    replay teaches those very answers' style)."""
    if not parent_ppl or not candidate_ppl or not (math.isfinite(parent_ppl) and math.isfinite(candidate_ppl)):
        return 0.0 if parent_ppl and candidate_ppl is not None else None
    return parent_ppl / candidate_ppl
