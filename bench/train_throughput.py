"""Useful (non-pad) training tokens/s of a round vs a seed-style HF Trainer, in one run.

Setup: the embedded model, 64 offline articles, maxLength 512.
Baseline: HF Trainer, padding="max_length" 512, batch 4, grad accumulation 4, lr 2e-5,
weight decay 0.01, fp32 -- the seed's web_learner.py.
Ours: selflearn's loop (packed blocks, bf16 compute with fp32 masters where the CPU runs bf16 fast).
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import matmul_peak_gflops, snapshot_articles  # noqa: E402

import torch  # noqa: E402

from selflearn import basemodel  # noqa: E402
from selflearn import precision as prec  # noqa: E402
from selflearn.trainer import data, loop  # noqa: E402


def eval_ppl(model, tok, texts, L=512):
    return loop.perplexity(model, data.batches(data.pack(data.tokenize(tok, texts), L, tok.eos_token_id), 4),
                           "fp32")


def baseline(model_dir, texts, tmp):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = basemodel.load_tokenizer(model_dir)
    model = basemodel.load_model(model_dir)
    enc = tok(texts, truncation=True, padding="max_length", max_length=512)
    useful = sum(sum(m) for m in enc["attention_mask"])
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    args = TrainingArguments(output_dir=str(tmp), num_train_epochs=1, per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=2e-5, weight_decay=0.01,
                             logging_steps=10, save_strategy="no", report_to=[], fp16=False, bf16=False,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    t0 = time.perf_counter()
    trainer.train()
    dt = time.perf_counter() - t0
    model.eval()
    return {"useful_tokens": useful, "total_tokens": len(texts) * 512, "seconds": dt,
            "useful_tokens_per_s": useful / dt, "ppl_trained_after": eval_ppl(model, tok, texts)}


def ours(model_dir, texts, lr, batch, accum, epochs):
    tok = basemodel.load_tokenizer(model_dir)
    model = basemodel.load_model(model_dir)
    device = prec.pick_device()
    precision = prec.resolve("auto", device)
    docs = data.tokenize(tok, texts)
    # Useful tokens: the articles' own tokens and separators, once each (the block that completes
    # the tail from the stream's start repeats a few dozen; they are not counted).
    useful = sum(len(d) + 1 for d in docs)
    blocks = data.pack(docs, 512, tok.eos_token_id, fill_tail=True)
    batches = data.batches(blocks, batch)
    master = loop.MasterWeights.for_cpu_bf16(model) if precision == "bf16" and device.type == "cpu" else None
    cfg = loop.LoopConfig(epochs=epochs, gradient_accumulation=accum, learning_rate=lr, weight_decay=0.01,
                          precision=precision)
    stats = loop.train(model, batches, cfg, master=master)
    if master:
        master.restore_fp32(model)
    return {"useful_tokens": useful, "trained_tokens": stats.tokens, "seconds": stats.seconds,
            "useful_tokens_per_s": useful / stats.seconds,
            "precision": precision, "steps": stats.steps, "ppl_trained_after": eval_ppl(model, tok, texts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--articles", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--skip-baseline", action="store_true")
    a = p.parse_args()
    import tempfile

    model_dir = basemodel.resolve("embedded:smollm2-135m-instruct")
    texts = [x.text for x in snapshot_articles(a.articles)]
    tok = basemodel.load_tokenizer(model_dir)
    ppl_base = eval_ppl(basemodel.load_model(model_dir), tok, texts)
    o = ours(model_dir, texts, a.lr, a.batch, a.accum, a.epochs)
    print("ours", json.dumps(o), flush=True)
    b = None
    if not a.skip_baseline:
        with tempfile.TemporaryDirectory() as tmp:
            b = baseline(model_dir, texts, tmp)
        print("baseline", json.dumps(b), flush=True)
    n_params = sum(p.numel() for p in basemodel.load_model(model_dir).parameters())
    peak = matmul_peak_gflops(o["precision"])
    achieved = 6 * n_params * o["useful_tokens_per_s"] / 1e9
    result = {
        "articles": len(texts),
        "useful_tokens_per_s": round(o["useful_tokens_per_s"], 1),
        "baseline_useful_tokens_per_s": round(b["useful_tokens_per_s"], 1) if b else None,
        "speedup": round(o["useful_tokens_per_s"] / b["useful_tokens_per_s"], 2) if b else None,
        "mfu": round(achieved / peak, 3),
        "peak_gflops": round(peak, 1),
        "precision": o["precision"],
        "baseline_pad_fraction": round(1 - b["useful_tokens"] / b["total_tokens"], 3) if b else None,
        "ppl_trained_base": round(ppl_base, 3),
        "ppl_trained_after": round(o["ppl_trained_after"], 3),
        "baseline_ppl_trained_after": round(b["ppl_trained_after"], 3) if b else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
