"""Does one round learn? Perplexity on the trained articles and on the fixed general set,
base model vs after one round of 64 offline articles. Prints one JSON object as its last line."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline env defaults)

from selflearn.spec import RunConfig, parse_spec  # noqa: E402
from selflearn.trainer.round import run_round  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--articles", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max-length", type=int, default=512)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(name="bench", spec=parse_spec({
            "sources": [{"snapshot": {"language": "en", "articlesPerRound": a.articles}}],
            "training": {"epochs": a.epochs, "batchSize": 4, "gradientAccumulation": 1, "learningRate": a.lr,
                         "maxLength": a.max_length, "evalArticles": 16, "generalArticles": 32,
                         # The language-model view of learning; bench/knowledge.py measures answers.
                         "format": "text", "chatEval": False},
            "storage": {"uri": f"file://{tmp}/store"}}))
        res = run_round(cfg, 1)
    ppl = {k: v.model_dump() for k, v in res.metrics.ppl.items()}
    out = {
        "articles": res.metrics.articles,
        "ppl_trained_base": round(ppl["trained"]["before"], 3),
        "ppl_trained_after": round(ppl["trained"]["after"], 3),
        "ppl_general_base": round(ppl["general"]["before"], 3),
        "ppl_general_after": round(ppl["general"]["after"], 3),
        "ppl_fresh_base": round(ppl["fresh"]["before"], 3),
        "ppl_fresh_after": round(ppl["fresh"]["after"], 3),
        "trained_drop": round(1 - ppl["trained"]["after"] / ppl["trained"]["before"], 3),
        "general_rise": round(ppl["general"]["after"] / ppl["general"]["before"] - 1, 3),
        "tokens_per_s": res.metrics.tokens_per_s,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
