"""Does the chat answer with what it learned, without losing its manners?

Runs the default `selflearn local` loop (headless: the same driver, trainer subprocesses, store and
gate) for 3 rounds on the embedded model and the offline snapshot, then asks the base model and
the final promoted checkpoint, greedy, through the chat prompt:
  * about every article the rounds learned, and about held-out articles no round saw, in the
    probe's three phrasings no round trains on ("What should I know about <title>?", ...) and the
    reverse question where the first sentence allows it (from its fact back to the title), scored
    on the answers (content words and exact facts of the first sentence; the title's words for the
    reverse question): closed book, the weights alone;
  * the same first phrasing about the learned articles with the article's lead in the prompt:
    open book, the ceiling of what the model makes of facts it can read;
  * the chat-retention prompts (reference-answer perplexity, format health).
For the round time it also runs one round of today's text-only format on the same articles'
kind, side by side. Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline env defaults)


def local_config(data_dir: Path, *, rounds_format: str | None = None):
    from selflearn.local.cli import add_arguments, build_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = build_config(p.parse_args(["--data-dir", str(data_dir), "--no-serve"]))
    if rounds_format:
        cfg.spec.training.format = rounds_format
    return cfg


def phases_of(cfg, uri: str | None) -> dict | None:
    """Where a published round's time went (its manifest's phase_seconds)."""
    if not uri:
        return None
    from selflearn.checkpoints import CheckpointStore
    from selflearn.local.records import RoundManifest

    store = CheckpointStore.from_uri(cfg.spec.storage.uri)
    return RoundManifest.parse(store.manifest(store.ref_for_uri(uri))).metrics.phase_seconds


def by_form(answers: dict) -> dict:
    """Mean score per set and question form: the three probe phrasings and the reverse question."""
    out: dict = {}
    for name, rows in answers.items():
        groups: dict[str, list[float]] = {}
        for row in rows:
            form = "reverse" if row.get("kind") == "reverse" else row["question"].replace(row["title"], "<t>")
            groups.setdefault(form, []).append(row["score"])
        out[name] = {f: round(sum(v) / len(v), 4) for f, v in groups.items()}
    return out


def unsupported_citations(answers: dict, memory, use) -> dict:
    """Of the answers that read passages (and so cite them), the share whose content words are
    mostly not in what they read: a cited source that does not hold the answer's facts."""
    from selflearn.trainer.probe import STOPWORDS, _words

    read = unsupported = 0
    for row in answers.get("memory_learned", []) + answers.get("memory_held_out", []):
        if not row.get("read") or memory is None:
            continue
        read += 1
        texts = " ".join(h.passage.text + " " + h.passage.title
                         for h in memory.search(row["question"], k=use.passages, threshold=use.threshold))
        said = {w for w in _words(row["answer"]) if w not in STOPWORDS["en"] and len(w) > 2}
        held = set(_words(texts))
        if said and len(said & held) / len(said) < 0.5:
            unsupported += 1
    return {"read": read, "fraction": round(unsupported / read, 4) if read else None}


def ttft_with_memory(checkpoint: str, base_model: str, learned: list) -> dict:
    """Time to first token at one user, through the serving engine, memory on and off (p50 ms of
    one question about each of up to 20 learned articles)."""
    import statistics

    from selflearn.serving.config import EngineOptions
    from selflearn.serving.engine import Engine
    from tests.support.engine import ask, generate

    eng = Engine(EngineOptions())
    eng.configure({"checkpoint": checkpoint, "base_model": base_model}, wait=True)
    try:
        out = {}
        for name, on in (("without", False), ("with", True)):
            times = [generate(eng, ask(f"What should I know about {a.title}?", max_new_tokens=4, memory=on)).ttft_ms
                     for a in learned[:20]]
            out[name] = round(statistics.median(times), 1)
        return out
    finally:
        eng.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--held-out", type=int, default=24, help="articles no round learned, to ask about")
    p.add_argument("--skip-text-round", action="store_true", help="do not time a text-only round")
    p.add_argument("--qa-named", action="store_true", help="training.qaNamed: also ask from the fact back to the subject")
    p.add_argument("--training", action="append", default=[], metavar="FIELD=JSON",
                   help="override a training field for the rounds, e.g. qa_pairs_per_article=3 (repeatable)")
    p.add_argument("--qa-reading", type=float, default=None,
                   help="training.qaReading for the rounds (default: the spec's): the share of pairs asked after passages")
    p.add_argument("--answers-out", default="/tmp/bench-knowledge-answers.json",
                   help="where to write every question and both models' answers")
    a = p.parse_args()

    import torch

    from selflearn import basemodel
    from selflearn.checkpoints import CheckpointStore
    from selflearn.local.driver import LocalDriver
    from selflearn.memory import Memory
    from selflearn.local.trainer_process import TrainerOptions
    from selflearn.sources.base import Article
    from selflearn.sources.snapshot import load_snapshot
    from selflearn.trainer import data, knowledge, loop, probe
    from selflearn.trainer.model_io import load_checkpoint_model

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-knowledge-") as tmp:
        tmp = Path(tmp)
        if not a.skip_text_round:
            text_cfg = local_config(tmp / "text", rounds_format="text")
            text_cfg.spec.training.chat_eval = False
            drv = LocalDriver(text_cfg, tmp / "text", trainer=TrainerOptions(nice=0))
            drv.prepare()
            t0 = time.time()
            res = drv.train(1, None)
            out["round_seconds_text_format"] = round(time.time() - t0, 1)
            out["phase_seconds_text_format"] = phases_of(text_cfg, res.checkpoint)
        cfg = local_config(tmp / "run")
        if a.qa_reading is not None:
            cfg.spec.training.qa_reading = a.qa_reading
        cfg.spec.training.qa_named = a.qa_named
        for item in a.training:
            field, _, value = item.partition("=")
            setattr(cfg.spec.training, field, json.loads(value))
        out["training_overrides"] = a.training
        drv = LocalDriver(cfg, tmp / "run", trainer=TrainerOptions(nice=0))
        drv.prepare()
        t0 = time.time()
        times, phases = [], []
        for r in range(1, a.rounds + 1):
            t1 = time.time()
            rec = drv.run_round(r)
            times.append(round(time.time() - t1, 1))
            phases.append(phases_of(cfg, rec.checkpoint))
            print(f"round {r}: {rec.reason}  ({times[-1]} s)", flush=True)
        loop_s = time.time() - t0
        store = CheckpointStore.from_uri(cfg.spec.storage.uri)
        final_uri = drv.state.promoted
        # What the final checkpoint learned: the articles of its own lineage (a rejected round's
        # articles were not learned by the rounds after it, which start from the promoted parent).
        learned: list[Article] = []
        uri = final_uri
        while uri:
            ref = store.ref_for_uri(uri)
            raw = store.checkpoint_file(ref, "articles.jsonl") or b""
            titles = {json.loads(x)["title"] for x in raw.decode().splitlines() if x.strip()}
            learned += [x for x in load_snapshot("en") if x.title in titles]
            uri = store.manifest(ref).get("parent")
        # Held out: articles after everything the rounds fetched (cursor), never trained.
        nxt = (store.get_json(f"{cfg.name}/state.json") or {}).get("cursors", {}).get("snapshot:en", {}).get("next", 0)
        held = list(load_snapshot("en")[nxt + 50:nxt + 50 + a.held_out])

        tok = basemodel.load_tokenizer(basemodel.resolve(cfg.spec.base_model))
        retention_items = probe.chat_references(probe.RETENTION_FILE)["items"]
        sets = knowledge.ProbeSets.of(learned, held, [], retention_items, phrasings=3, open_book=len(learned),
                                      memory_use=cfg.spec.serving.memory)
        L = cfg.spec.training.max_length

        def evaluate(model, memory=None):
            model = model.to(torch.bfloat16).eval()
            rep = knowledge.measure(model, tok, sets, block=L, precision="bf16", memory=memory)
            docs = data.batches(data.pack(data.tokenize(tok, [x.text for x in learned]), L, tok.eos_token_id), 4)
            return {"answers": rep.answers, "knowledge": rep.knowledge, "by_form": by_form(rep.answers),
                    "chat_ppl": rep.chat_ppl,
                    "format_ok": rep.format_ok, "format_failures": rep.format_failures,
                    "ppl_learned": loop.perplexity(model, docs, "bf16")}

        base = evaluate(basemodel.load_model(cfg.spec.base_model))
        if final_uri:
            ref = store.ref_for_uri(final_uri)
            path = tmp / "final"
            manifest = store.download(ref, path)
            final_memory = Memory.load(path)
            final = evaluate(load_checkpoint_model(path, manifest), final_memory)
            final["unsupported"] = unsupported_citations(final["answers"], final_memory, cfg.spec.serving.memory)
            final["ttft_ms"] = ttft_with_memory(final_uri, cfg.spec.base_model, learned)
        else:
            final = base
        examples = []
        for b, f in zip(base["answers"]["learned"], final["answers"]["learned"]):
            examples.append({"question": f["question"], "base": b["answer"], "learned": f["answer"],
                             "base_score": b["score"], "learned_score": f["score"]})
        Path(a.answers_out).write_text(json.dumps({"base": base["answers"], "learned": final["answers"],
                                                   "format_failures": final["format_failures"]}, indent=1,
                                                  ensure_ascii=False))
        better = sum(1 for e in examples if e["learned_score"] > e["base_score"])
        worse = sum(1 for e in examples if e["learned_score"] < e["base_score"])
        examples.sort(key=lambda e: e["learned_score"] - e["base_score"], reverse=True)
        mid = len(examples) // 2
        shown = [examples[0], examples[mid], examples[-1]] if examples else []
        for e in shown:
            print(json.dumps(e, ensure_ascii=False), flush=True)

    def r4(x):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(x, 4)

    out.update({
        "rounds": a.rounds,
        "qa_reading": cfg.spec.training.qa_reading,
        "qa_named": cfg.spec.training.qa_named,
        "promoted": [r.promoted for r in drv.state.rounds],
        "reasons": [r.reason for r in drv.state.rounds],
        "final_checkpoint": drv.state.promoted_id,
        "articles_learned": len(learned),
        "held_out_articles": len(held),
        "questions_learned": len(base["answers"]["learned"]),
        "closedbook_learned_base": r4(base["knowledge"]["learned"]),
        "closedbook_learned_after": r4(final["knowledge"]["learned"]),
        "closedbook_learned_ratio": r4(final["knowledge"]["learned"] / base["knowledge"]["learned"])
        if base["knowledge"]["learned"] else None,
        "closedbook_learned_by_form_base": base["by_form"]["learned"],
        "closedbook_learned_by_form_after": final["by_form"]["learned"],
        "answers_better": better, "answers_worse": worse,
        "heldout_base": r4(base["knowledge"]["held_out"]),
        "heldout_after": r4(final["knowledge"]["held_out"]),
        "openbook_base": r4(base["knowledge"]["open_book"]),
        "openbook_after": r4(final["knowledge"]["open_book"]),
        "memory_learned_base": r4(base["knowledge"]["memory_learned"]),
        "memory_learned_after": r4(final["knowledge"]["memory_learned"]),
        "memory_learned_ratio_to_closedbook": r4(final["knowledge"]["memory_learned"] / final["knowledge"]["learned"])
        if final["knowledge"]["learned"] else None,
        # The same held-out questions as the base model answers them (it has no memory): compare
        # with this, not with heldout_base, which also counts the reverse questions.
        "memory_heldout_base": r4(base["knowledge"]["memory_held_out"]),
        "memory_heldout_after": r4(final["knowledge"]["memory_held_out"]),
        "memory_answers_that_read": final.get("unsupported", {}).get("read"),
        "unsupported_citation_fraction": final.get("unsupported", {}).get("fraction"),
        "ttft_p50_ms_with_memory": final.get("ttft_ms", {}).get("with"),
        "ttft_p50_ms_without_memory": final.get("ttft_ms", {}).get("without"),
        "chat_retention": r4(probe.retention(base["chat_ppl"], final["chat_ppl"])),
        "format_ok_fraction_base": r4(base["format_ok"]),
        "format_ok_fraction": r4(final["format_ok"]),
        "format_failures": [f["prompt"] for f in final["format_failures"]],
        "ppl_learned_base": r4(base["ppl_learned"]),
        "ppl_learned_after": r4(final["ppl_learned"]),
        "ppl_learned_drop": r4(1 - final["ppl_learned"] / base["ppl_learned"]),
        "round_seconds": r4(sum(times) / len(times)),
        "round_seconds_each": times,
        "phase_seconds_each": phases,
        "round_time_ratio": r4(sum(times) / len(times) / out["round_seconds_text_format"])
        if out.get("round_seconds_text_format") else None,
        "loop_seconds": round(loop_s, 1),
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
