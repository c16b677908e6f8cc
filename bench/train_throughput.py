"""Useful (non-pad) training tokens/s of a round vs a seed-style HF Trainer, in one run.

Setup: the embedded model, 64 offline articles, maxLength 512.
Baseline: HF Trainer, padding="max_length" 512, batch 4, grad accumulation 4, lr 2e-5,
weight decay 0.01, fp32 -- the seed's web_learner.py.
Ours: selflearn's loop (packed blocks, bf16 compute with fp32 masters where the CPU runs bf16 fast).

Ranks (`--ranks`, on by default): the same loop as 1 process x 1 thread, 2 processes x 1 thread
(DDP over gloo, under PyTorch's elastic launcher, as `selflearn train --procs 2` runs it), 1 process
x 2 threads (today's way), and 2 processes under FSDP, each on the same packed blocks and global
batch; steady-state tokens/s (the first step, which compiles, left out), and the bytes each rank
holds after one step (parameters with fp32 masters, gradients, optimizer state).
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


def rank_worker(out: str, strategy: str, articles: int, batch: int, accum: int, steps: int) -> None:
    """One rank (or the only process) of the ranks comparison; rank 0 writes its figures to `out`."""
    import resource

    from selflearn.trainer import distributed

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    model_dir = basemodel.resolve("embedded:smollm2-135m-instruct")
    tok = basemodel.load_tokenizer(model_dir)
    model = basemodel.load_model(model_dir)
    model.config.use_cache = False
    device = prec.pick_device()
    precision = prec.resolve("auto", device)
    world = distributed.join(device, 1800)
    world = distributed.with_strategy(world, strategy, model, device)
    blocks = data.pack(data.tokenize(tok, [x.text for x in snapshot_articles(articles)]), 512, tok.eos_token_id,
                       fill_tail=True)
    batches = data.batches(blocks, batch)[:steps * accum]  # whole windows only: every step the same tokens
    master = loop.MasterWeights.for_cpu_bf16(model) if precision == "bf16" and device.type == "cpu" else None
    marks: list[float] = []
    cfg = loop.LoopConfig(epochs=1, gradient_accumulation=accum, learning_rate=2e-5, precision=precision)
    stats = loop.train(model, batches, cfg, master=master, world=world,
                       on_step=lambda e: marks.append(time.perf_counter()), kind="train")
    if stats.steps < 2:
        raise SystemExit(f"{len(batches)} batches make {stats.steps} step(s): raise --articles for --steps {steps}")
    per_step = stats.tokens / stats.steps
    if world.leader:
        Path(out).write_text(json.dumps({
            "tok_s": round(per_step * (len(marks) - 1) / (marks[-1] - marks[0]), 1),
            "steps": stats.steps, "held_bytes": stats.held_bytes, "precision": precision,
            "strategy": world.strategy, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "losses": [round(x, 4) for x in stats.losses]}))
    distributed.leave(world)


def ranks(articles: int, batch: int, accum: int, steps: int) -> dict:
    """The loop on 1 x 1, 2 x 1 (DDP), 1 x 2 and 2 x 1 (FSDP) processes x threads, one after another."""
    import os
    import subprocess
    import tempfile

    runs = {"procs_1_tok_s": (1, 1, "ddp"), "procs_2_tok_s": (2, 1, "ddp"), "procs_1_threads_2_tok_s": (1, 2, "ddp"),
            "fsdp_procs_2_tok_s": (2, 1, "fsdp")}
    got: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        for name, (procs, threads, strategy) in runs.items():
            out = Path(tmp) / f"{name}.json"
            worker = [str(Path(__file__).resolve()), "--worker", str(out), "--strategy", strategy,
                      "--rank-articles", str(articles), "--rank-batch", str(batch), "--rank-accum", str(accum),
                      "--steps", str(steps)]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                   *worker] if procs > 1 else [sys.executable, *worker]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            got[name] = json.loads(out.read_text())
            print(name, json.dumps(got[name]), flush=True)
    ddp, fsdp = got["procs_2_tok_s"]["held_bytes"], got["fsdp_procs_2_tok_s"]["held_bytes"]
    return {
        **{name: r["tok_s"] for name, r in got.items()},
        "scaling_efficiency": round(got["procs_2_tok_s"]["tok_s"] / (2 * got["procs_1_tok_s"]["tok_s"]), 3),
        "ddp_bytes_per_rank": ddp, "fsdp_bytes_per_rank": fsdp,
        "fsdp_over_ddp_bytes": round(sum(fsdp.values()) / sum(ddp.values()), 3),
        "ddp_max_rss_mb": got["procs_2_tok_s"]["max_rss_mb"], "fsdp_max_rss_mb": got["fsdp_procs_2_tok_s"]["max_rss_mb"],
        # bf16 compute: the sums' order differs between 1 and 2 ranks, the losses by a few 1e-3.
        "loss_diff_ddp_vs_one": round(max(abs(x - y) for x, y in zip(got["procs_2_tok_s"]["losses"],
                                                                     got["procs_1_tok_s"]["losses"])), 4),
        "rank_steps": got["procs_1_tok_s"]["steps"], "rank_batch": batch, "rank_accum": accum,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--articles", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--skip-ours", action="store_true", help="only the ranks comparison")
    p.add_argument("--no-ranks", action="store_true", help="leave out the ranks comparison")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps of each ranks run")
    p.add_argument("--rank-articles", type=int, default=320, help="articles of the ranks comparison")
    p.add_argument("--rank-batch", type=int, default=2, help="micro-batch of the ranks comparison")
    p.add_argument("--rank-accum", type=int, default=8,
                   help="micro-batches a step in the ranks comparison (each of 2 ranks takes half)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return rank_worker(a.worker, a.strategy, a.rank_articles, a.rank_batch, a.rank_accum, a.steps)
    import tempfile

    if a.skip_ours:
        print(json.dumps(ranks(a.rank_articles, a.rank_batch, a.rank_accum, a.steps)))
        return

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
    if not a.no_ranks:
        result.update(ranks(a.rank_articles, a.rank_batch, a.rank_accum, a.steps))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
