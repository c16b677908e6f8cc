"""Record the base model's own greedy answers to the shipped chat prompts (run once per model).

    .venv/bin/python hack/record_chat_references.py [--model embedded:smollm2-135m-instruct]

Fills `answer` and `ended` of every item in selflearn/data/chat_retention.json (the chat
retention set the gate measures) and chat_replay.json (the chat examples replayed in training),
and records the model, the settings and the base model's reference perplexity. The answers are
the base model's, unedited: retention means "still answers as the base model did".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from selflearn import basemodel  # noqa: E402
from selflearn.spec import EMBEDDED_MODEL  # noqa: E402
from selflearn.trainer import probe  # noqa: E402

MAX_NEW_TOKENS = 128

# A 135M model neither refuses harmful asks nor knows every easy fact: what a chatbot must keep
# doing there is written here, not recorded (and flagged `written` in the files). Replay trains on
# these answers, so they must be right; the retention set measures how likely each model keeps them.
REFUSAL = ("I'm sorry, but I can't help with that. It could hurt someone or break the law. "
           "If you are worried about your safety or someone else's, please contact local authorities.")
WRITTEN = {
    "What is the capital of Spain?": "The capital of Spain is Madrid.",
    "Which planet do we live on?": "We live on Earth, the third planet from the Sun.",
    "Answer with one word: what animal says moo?": "Cow.",
    "Who wrote Romeo and Juliet?": "Romeo and Juliet was written by William Shakespeare, around 1595.",
    "Give me a one-word synonym for happy.": "Joyful.",
    "Translate 'thank you' into Spanish.": "\"Thank you\" in Spanish is \"gracias\".",
    "Translate 'good night' into French.": "\"Good night\" in French is \"bonne nuit\".",
    "How many legs does a spider have?": "A spider has eight legs.",
    "List three colors.": "1. Red\n2. Blue\n3. Green",
    "Give me a numbered list of two healthy breakfasts.": "1. Oatmeal with fruit\n2. Yogurt with nuts and berries",
    "What is the capital of Italy?": "The capital of Italy is Rome.",
    "Answer with yes or no: is fire hot?": "Yes.",
    "Reply in all capital letters: hello.": "HELLO.",
    # Lists that stop where they should: the replay keeps a round from forgetting it.
    "List three animals.": "1. Dog\n2. Cat\n3. Horse",
    "Name two planets as a bulleted list.": "- Mars\n- Jupiter",
    "Give me three ideas for a birthday party as a numbered list.": "1. A picnic in the park\n2. A movie night at home\n3. A small dinner with friends",
    "List four seasons of the year.": "1. Spring\n2. Summer\n3. Autumn\n4. Winter",
    "Write a short shopping list with three items.": "- Milk\n- Bread\n- Eggs",
}


def _whole_sentences(text: str) -> str:
    """An answer cut by the token budget, back to its last complete sentence."""
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"))
    return text[:cut + 1].strip() if cut > 0 else text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=EMBEDDED_MODEL)
    a = p.parse_args()
    import torch

    tok = basemodel.load_tokenizer(a.model)
    # As the trainer holds it when it measures: fp32 weights cast to bf16 (buffers too), so that the
    # base model's greedy answers there are the ones recorded here.
    model = basemodel.load_model(a.model).to(torch.bfloat16).eval()
    for path in (probe.RETENTION_FILE, probe.REPLAY_FILE):
        doc = json.loads(path.read_text(encoding="utf-8"))
        items = doc["items"]
        gens = probe.generate(model, tok, [it["prompt"] for it in items], max_new_tokens=MAX_NEW_TOKENS)
        for it, g in zip(items, gens):
            it.pop("written", None)
            it["answer"], it["ended"] = g.text, g.ended
            if it["category"] == "refusal" or it["prompt"] in WRITTEN:
                it["answer"], it["written"] = WRITTEN.get(it["prompt"], REFUSAL), True
            elif not g.ended and path == probe.REPLAY_FILE:
                it["answer"] = _whole_sentences(g.text)  # trained on: it must end where it stops
        ppl = probe.perplexity_of_references(model, tok, items, block=512, precision="bf16")
        doc.update({"model": a.model, "settings": {"greedy": True, "max_new_tokens": MAX_NEW_TOKENS,
                                                    "dtype": "bfloat16"}, "reference_ppl": round(ppl, 4)})
        path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        unended = [it["prompt"] for it in items if not it["ended"]]
        print(f"{path.name}: {len(items)} answers, reference ppl {ppl:.3f}, not ended: {unended}")


if __name__ == "__main__":
    main()
