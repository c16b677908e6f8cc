"""One rank of tests/test_distributed.py's shared-generation check, run under the elastic launcher:
greedy answers of the embedded model to the prompts in argv[1], generated a share of whole batches
per rank (`probe.generate(world=...)`); rank 0 writes every answer, in order, to argv[2]."""

from __future__ import annotations

import json
import sys

import torch

from selflearn import basemodel
from selflearn.trainer import distributed, probe


def main() -> None:
    prompts, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    world = distributed.join(torch.device("cpu"), 300)
    model_dir = basemodel.resolve("embedded:smollm2-135m-instruct")
    model, tok = basemodel.load_model(model_dir), basemodel.load_tokenizer(model_dir)
    gens = probe.generate(model, tok, prompts, max_new_tokens=8, batch_size=4, world=world)
    if world.leader:
        open(out, "w").write(json.dumps([g.text for g in gens]))
    distributed.leave(world)


if __name__ == "__main__":
    main()
