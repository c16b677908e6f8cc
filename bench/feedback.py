"""Does a round learn what users corrected, without losing its manners?

Asks the base model 20 questions about made-up facts (tests/data/made_up_facts.json), greedy,
through the chat prompt, and stores a correction of each answer exactly as `POST /feedback` stores
it (selflearn.serving.state.FeedbackStore, with the answer joined), from 4 clients of 5 corrections
each. Then one default `selflearn local` round (headless: the same driver, trainer subprocess,
store and gate) learns them, and the promoted checkpoint is asked the same questions and a
paraphrase of each, never trained. A fact counts as recalled when the answer contains its key
word. Side by side, the same round without feedback gives the round time it adds. Prints one JSON
object as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline env defaults)

FACTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "made_up_facts.json"


def local_config(data_dir: Path, *extra: str):
    from selflearn.local.cli import add_arguments, build_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    return build_config(p.parse_args(["--data-dir", str(data_dir), "--no-serve", *extra]))


def recall(answers: list[str], keys: list[str]) -> float:
    return round(sum(k.lower() in a.lower() for a, k in zip(answers, keys)) / len(keys), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--corrections", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--skip-baseline-round", action="store_true", help="do not time a round without feedback")
    p.add_argument("--answers-out", default="/tmp/bench-feedback-answers.json")
    p.add_argument("--source", default="{}", metavar="JSON",
                   help="overrides of the feedback source's settings, e.g. '{\"repeats\": 8}'")
    a = p.parse_args()

    import torch

    from selflearn import basemodel
    from selflearn.checkpoints import CheckpointStore
    from selflearn.feedback import client_hash, feedback_uri
    from selflearn.local.driver import LocalDriver
    from selflearn.local.trainer_process import TrainerOptions
    from selflearn.serving.state import FeedbackStore
    from selflearn.trainer import probe
    from selflearn.trainer.model_io import load_checkpoint_model

    facts = json.loads(FACTS.read_text())["facts"][:a.corrections]
    questions, paraphrases = [f["question"] for f in facts], [f["paraphrase"] for f in facts]
    keys = [f["answer"] for f in facts]
    out: dict = {"corrections": len(facts), "clients": a.clients}
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        tmp = Path(tmp)
        if not a.skip_baseline_round:
            drv = LocalDriver(local_config(tmp / "plain", "--no-feedback"), tmp / "plain", trainer=TrainerOptions(nice=0))
            drv.prepare()
            t0 = time.time()
            drv.train(1, None)
            out["round_seconds_without_feedback"] = round(time.time() - t0, 1)

        cfg = local_config(tmp / "run")
        for s in cfg.spec.sources:
            if s.feedback is not None:
                s.feedback = type(s.feedback).model_validate({**s.feedback.model_dump(by_alias=True),
                                                              **json.loads(a.source)})
        out["source"] = cfg.spec.feedback.model_dump(by_alias=True, exclude_none=True)
        tok = basemodel.load_tokenizer(basemodel.resolve(cfg.spec.base_model))

        def ask(model, prompts):
            return [g.text for g in probe.generate(model.to(torch.bfloat16).eval(), tok, prompts,
                                                  max_new_tokens=48)]

        base = basemodel.load_model(cfg.spec.base_model)
        base_q, base_p = ask(base, questions), ask(base, paraphrases)
        del base
        # What /feedback writes: the answer joined by its response id, a correction, the client's hash.
        fb = FeedbackStore(feedback_uri(cfg.spec.storage.uri, cfg.name))
        now = time.time() - 60
        for i, (f, reply) in enumerate(zip(facts, base_q)):
            fb.put({"id": f"bench{i:04d}", "at": now + i * 0.01, "matched": True, "rating": "down",
                    "response_id": f"r{i}", "prompt": f["question"], "reply": reply, "checkpoint": None,
                    "correction": f["correction"], "client": client_hash(f"10.0.0.{i % a.clients}")})

        drv = LocalDriver(cfg, tmp / "run", trainer=TrainerOptions(nice=0))
        drv.prepare()
        t0 = time.time()
        rec = drv.run_round(1)
        out["round_seconds"] = round(time.time() - t0, 1)
        print(f"round 1: {rec.reason}", flush=True)
        store = CheckpointStore.from_uri(cfg.spec.storage.uri)
        ref = store.ref(cfg.name, 1)
        manifest = store.manifest(ref)
        m = manifest["metrics"]
        learned = load_checkpoint_model(tmp / "cand", store.download(ref, tmp / "cand"))
        after_q, after_p = ask(learned, questions), ask(learned, paraphrases)
        Path(a.answers_out).write_text(json.dumps(
            [{"question": q, "paraphrase": pq, "key": k, "base": bq, "learned": lq, "base_paraphrase": bp,
              "learned_paraphrase": lp} for q, pq, k, bq, lq, bp, lp in
             zip(questions, paraphrases, keys, base_q, after_q, base_p, after_p)], indent=1, ensure_ascii=False))
        for i in (0, len(facts) // 2, len(facts) - 1):
            print(json.dumps({"paraphrase": paraphrases[i], "base": base_p[i], "learned": after_p[i]},
                             ensure_ascii=False), flush=True)
        general = m["ppl"]["general"]
        out.update({
            "promoted": rec.promoted,
            "reason": rec.reason,
            "feedback_learned": len(manifest.get("feedback", [])),
            "base_recall": recall(base_q, keys),
            "base_recall_paraphrase": recall(base_p, keys),
            "recall_same_question": recall(after_q, keys),
            "recall_paraphrase": recall(after_p, keys),
            "preference_held_out": m.get("feedback", {}).get("preference"),
            "chat_retention": (m.get("chat") or {}).get("retention"),
            "format_ok": (m.get("chat") or {}).get("format_ok"),
            "knowledge_learned": (m.get("knowledge") or {}).get("learned"),
            "general_ppl_rise": round(general["after"] / general["before"] - 1, 4),
            "phase_seconds": m.get("phase_seconds"),
        })
        if out.get("round_seconds_without_feedback"):
            out["round_time_ratio"] = round(out["round_seconds"] / out["round_seconds_without_feedback"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
