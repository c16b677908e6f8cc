"""Serving figures: batched throughput vs a seed-style server, time to first token, hot-swap cost.

    .venv/bin/python bench/serve_throughput.py            # ~5 minutes on 2 CPU cores
    .venv/bin/python bench/serve_throughput.py --quick    # fewer requests, for a smoke run

1. Baseline: a seed-style server in a subprocess (FastAPI, one `model.generate` per request, no
   batching, fp32 as the seed loads it; and again in bf16 so the batching gain shows on its own).
2. selflearn: the real app (`start_local`: Ray Serve, ChatIngress -> ChatModel, continuous batching)
   on each engine of `--engines` (OpenVINO, then torch; the first one's figures at the top level).
   Both get the same load: CONCURRENCY clients, each asking for 64 new tokens, ROUNDS requests each.
3. TTFT: streaming /chat/stream at concurrency 1, time until the first token event.
4. Swap: clients keep sending while the checkpoint changes twice (file:// store with two published
   checkpoints, each with its OpenVINO IR as the trainer publishes it); time from update_checkpoint
   to the first answer carrying the new id, and failures. `publish_to_serving_s` adds the export.
5. Peer: llama.cpp's llama-server (built once by hack/llama-server.sh) on a BF16 GGUF of the same
   weights (llama.cpp's convert_hf_to_gguf.py) and on the bundled Q4_1 GGUF, with continuous
   batching, one slot per client and 2 threads; it and selflearn get the same load through the
   OpenAI route (/v1/chat/completions). `--no-peer` leaves it out.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_cpp_peer import bf16_gguf, llama_server_binary, q4_gguf, stop, wait_healthy  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Explain how a rainbow forms.",
    "Describe the city of Paris to a child.", "What are the benefits of regular exercise?",
    "Tell me about the history of the bicycle.", "How do bees make honey?",
    "Write a poem about autumn leaves.", "Explain photosynthesis simply.",
    "What should I pack for a hiking trip?", "Describe how a computer works.",
    "Why is the sky blue?", "Give me tips for learning a new language.",
    "Tell me about the planet Mars.", "How does a train work?",
    "Write a letter to a friend about a holiday.", "Explain what gravity is.",
]
BODY = {"max_length": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 50}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# -- the seed-style baseline server --------------------------------------------------------------------
class BaselineChat(BaseModel):  # module level: FastAPI resolves the (string) annotation here
    message: str
    temperature: float = 0.7
    max_length: int = 64
    top_p: float = 0.9
    top_k: int = 50


def baseline_server(port: int, dtype_name: str) -> None:
    """FastAPI + one model.generate per request (threadpool endpoint), like the seed app."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from selflearn import basemodel

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    tok = basemodel.load_tokenizer("embedded:smollm2-135m-instruct")
    model = basemodel.load_model("embedded:smollm2-135m-instruct", dtype=dtype).eval()
    app = FastAPI()

    @app.post("/chat")
    def chat(body: BaselineChat):
        ids = tok.apply_chat_template([{"role": "user", "content": body.message}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=body.max_length, do_sample=body.temperature > 0,
                                 temperature=body.temperature or None, top_p=body.top_p, top_k=body.top_k,
                                 pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return {"reply": tok.decode(new, skip_special_tokens=True), "completion_tokens": int(new.numel())}

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- load ------------------------------------------------------------------------------------------------
def run_load(url: str, concurrency: int, rounds: int, tokens_field: str, route: str = "chat") -> dict:
    """CONCURRENCY clients, ROUNDS requests each; route "chat" (/chat) or "openai" (/v1/chat/completions)."""
    import httpx

    latencies: list[float] = []
    tokens, failures = 0, 0
    lock = threading.Lock()
    model = "default"
    if route == "openai":  # the name the server lists (selflearn checks it; llama-server takes any)
        models = httpx.get(f"{url}/v1/models", timeout=30).json().get("data") or [{}]
        model = models[0].get("id") or model

    def client(i: int) -> None:
        nonlocal tokens, failures
        with httpx.Client(timeout=900) as http:
            for r in range(rounds):
                prompt = PROMPTS[(i + r) % len(PROMPTS)]
                if route == "openai":
                    path, body = "/v1/chat/completions", {
                        "model": model, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": BODY["max_length"], "temperature": BODY["temperature"],
                        "top_p": BODY["top_p"], "top_k": BODY["top_k"]}
                else:
                    path, body = "/chat", {**BODY, "message": prompt}
                t0 = time.perf_counter()
                resp = http.post(f"{url}{path}", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if resp.status_code != 200:
                        failures += 1
                        continue
                    doc = resp.json()
                    n = doc["usage"]["completion_tokens"] if tokens_field == "usage" else doc[tokens_field]
                    tokens += n
                    latencies.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(client, range(concurrency)))
    wall = time.perf_counter() - t0
    if not tokens:
        raise RuntimeError(f"every request to {url} failed")
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall, "failures": failures,
            "p50_ms": pct(latencies, 0.5) * 1000, "p95_ms": pct(latencies, 0.95) * 1000}


# -- the peer: llama.cpp's llama-server (bench/llama_cpp_peer.py) ----------------------------------------
def run_peer(binary: str, model: Path, concurrency: int, rounds: int) -> dict:
    port = free_port()
    ctx_per_slot = 512
    proc = subprocess.Popen([binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "-np", str(concurrency), "-c", str(ctx_per_slot * concurrency), "-t", "2",
                             "--cont-batching", "--jinja", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/health", proc, "llama-server")
        run_load(url, 1, 1, "usage", route="openai")  # warm
        return run_load(url, concurrency, rounds, "usage", route="openai")
    finally:
        stop(proc)


def warm(url: str) -> None:
    import httpx

    httpx.post(f"{url}/chat", json={**BODY, "message": "Hi", "max_length": 4}, timeout=300)


def run_baseline(dtype: str, concurrency: int, rounds: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(port), "--baseline-dtype", dtype])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/healthz", proc, "the baseline server")
        warm(url)
        return run_load(url, concurrency, rounds, "completion_tokens")
    finally:
        stop(proc, signal.SIGINT)


# -- selflearn: TTFT and swap ----------------------------------------------------------------------------
def ttft(url: str, n: int) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=300) as http:
        for i in range(n):
            t0 = time.perf_counter()
            with http.stream("POST", f"{url}/chat/stream",
                             json={**BODY, "message": PROMPTS[i % len(PROMPTS)], "max_length": 16}) as resp:
                lines = resp.iter_lines()
                for line in lines:
                    if line.startswith("event: token"):
                        out.append((time.perf_counter() - t0) * 1000)
                        break
                for _ in lines:  # read the rest of the answer before the next request
                    pass
    return out


def publish_checkpoints(root: Path) -> tuple[list[str], float]:
    """Two checkpoints of the embedded model (bf16 copy) in a file:// store, each with its OpenVINO
    IR as the trainer publishes it; returns their URIs and the seconds the export took."""
    import torch

    from selflearn import basemodel, openvino_ir
    from selflearn.checkpoints import CheckpointStore

    src = root / "src"
    model = basemodel.load_model("embedded:smollm2-135m-instruct", dtype=torch.bfloat16)
    model.save_pretrained(src)
    basemodel.load_tokenizer("embedded:smollm2-135m-instruct").save_pretrained(src)
    t0 = time.perf_counter()
    openvino_ir.export(src, src / openvino_ir.CHECKPOINT_SUBDIR)
    export_s = time.perf_counter() - t0
    store = CheckpointStore.from_uri(f"file://{root / 'store'}")
    uris = []
    for r in (1, 2):
        uris.append(store.publish("bench", r, src, {"base_model": "embedded:smollm2-135m-instruct"}).uri)
    return uris, export_s


def swap_under_load(server, url: str, targets: list[tuple[str, str]], engine: str, clients: int = 4) -> dict:
    import httpx

    records: list[tuple[float, int, str | None]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=300) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/chat", json={**BODY, "message": PROMPTS[i], "max_length": 8})
                    code, ck = r.status_code, r.headers.get("x-model-checkpoint")
                except httpx.HTTPError:
                    code, ck = 599, None
                with lock:
                    records.append((t0, code, ck, time.perf_counter()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2)
    t_start = time.perf_counter()
    swap_seconds = []
    try:
        for uri, ckpt_id in targets:
            t0 = time.perf_counter()
            server.update_checkpoint({"checkpoint": uri, "engine": engine})
            while True:
                with lock:
                    hit = [end for (_, code, ck, end) in records if ck == ckpt_id and end > t0]
                if hit:
                    swap_seconds.append(min(hit) - t0)
                    break
                if time.perf_counter() - t0 > 600:
                    raise TimeoutError(f"no answer from {ckpt_id}")
                time.sleep(0.05)
            time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    during = [r for r in records if r[0] >= t_start]
    return {"swap_seconds": max(swap_seconds), "swap_seconds_each": swap_seconds,
            "swap_requests": len(during), "swap_failed_requests": sum(1 for r in during if r[1] != 200)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client for selflearn")
    ap.add_argument("--baseline-rounds", type=int, default=1, help="requests per client for the baseline")
    ap.add_argument("--baseline-dtypes", default="fp32,bf16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peer", action="store_true", help="leave llama.cpp's llama-server out")
    ap.add_argument("--engines", default="openvino,torch",
                    help="serving engines to measure, the first one's figures at the top level")
    ap.add_argument("--baseline-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-dtype", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        return baseline_server(args.baseline_server, args.baseline_dtype)
    if args.quick:
        args.rounds, args.baseline_dtypes = 1, "fp32"

    result: dict = {"concurrency": args.concurrency, "new_tokens": BODY["max_length"], "cpus": os.cpu_count()}
    baselines = {}
    for dtype in args.baseline_dtypes.split(","):
        baselines[dtype] = run_baseline(dtype, args.concurrency, args.baseline_rounds)
        print(f"baseline {dtype}: {json.dumps(baselines[dtype])}", flush=True)

    peers = {}
    if not args.no_peer:
        binary = llama_server_binary()
        for name, model in (("bf16", bf16_gguf()), ("q4_1", q4_gguf())):
            try:
                peers[name] = run_peer(binary, model, args.concurrency, args.rounds)
            except RuntimeError as err:  # llama-server 11434 segfaults loading the bundled Q4_1 GGUF
                if name == "bf16":
                    raise
                peers[name] = {"error": str(err)[-300:]}
            print(f"llama-server {name}: {json.dumps(peers[name])}", flush=True)

    import ray

    from selflearn.serving.app import shutdown, start_local

    tmp = Path(tempfile.mkdtemp(prefix="selflearn-bench-"))
    engines: dict[str, dict] = {}
    try:
        uris, export_s = publish_checkpoints(tmp)
        for engine in args.engines.split(","):
            port = free_port()
            t0 = time.perf_counter()
            server = start_local(port=port, user_config={"engine": engine},
                                 args={"engine": {"max_batch_size": max(16, args.concurrency)}})
            url = server.url
            warm(url)
            ready_s = time.perf_counter() - t0
            ours = run_load(url, args.concurrency, args.rounds, "usage")
            print(f"selflearn {engine}: {json.dumps(ours)}", flush=True)
            ours_openai = run_load(url, args.concurrency, args.rounds, "usage", route="openai")
            print(f"selflearn {engine} (OpenAI route): {json.dumps(ours_openai)}", flush=True)
            firsts = ttft(url, 5 if args.quick else 10)
            swap = swap_under_load(server, url, [(uris[0], "bench/r000001"), (uris[1], "bench/r000002")], engine)
            engines[engine] = {"chat": ours, "openai": ours_openai, "ttft": firsts, "swap": swap,
                               "start_s": ready_s}
            shutdown()
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    main_engine = args.engines.split(",")[0]
    ours, ours_openai, firsts, swap = (engines[main_engine][k] for k in ("chat", "openai", "ttft", "swap"))
    result["engine"] = main_engine
    # From a trainer's published files to the first answer on them: the export (the trainer's cost
    # at publish) and the swap under load (download of the IR, load, first answer).
    result["openvino_export_s"] = round(export_s, 1)
    if "openvino" in engines:
        result["publish_to_serving_s"] = round(export_s + engines["openvino"]["swap"]["swap_seconds"], 1)
    result["engines"] = {name: {"tokens_per_s": round(e["chat"]["tokens_per_s"], 1),
                                "openai_tokens_per_s": round(e["openai"]["tokens_per_s"], 1),
                                "openai_p95_ms": round(e["openai"]["p95_ms"]),
                                "ttft_p50_ms": round(statistics.median(e["ttft"])),
                                "swap_seconds": round(e["swap"]["swap_seconds"], 2),
                                "swap_failed_requests": e["swap"]["swap_failed_requests"],
                                "failures": e["chat"]["failures"] + e["openai"]["failures"],
                                "start_s": round(e["start_s"], 1)} for name, e in engines.items()}

    base = baselines[args.baseline_dtypes.split(",")[0]]
    result.update({
        "tokens_per_s": round(ours["tokens_per_s"], 1), "baseline_tokens_per_s": round(base["tokens_per_s"], 1),
        "speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
        "p50_ms": round(ours["p50_ms"]), "p95_ms": round(ours["p95_ms"]),
        "baseline_p50_ms": round(base["p50_ms"]), "baseline_p95_ms": round(base["p95_ms"]),
        "baseline_dtype": args.baseline_dtypes.split(",")[0], "failures": ours["failures"] + base["failures"],
        "ttft_p50_ms": round(statistics.median(firsts)), "ttft_ms_all": [round(x) for x in firsts],
        **{k: (round(v, 2) if isinstance(v, float) else [round(x, 2) for x in v] if isinstance(v, list) else v)
           for k, v in swap.items()},
    })
    result["openai_tokens_per_s"] = round(ours_openai["tokens_per_s"], 1)
    result["openai_p95_ms"] = round(ours_openai["p95_ms"])
    if peers:
        peer = peers["bf16"]
        for e in result["engines"].values():
            e["ratio_to_peer"] = round(e["openai_tokens_per_s"] / peer["tokens_per_s"], 2)
        result.update({
            "peer": "llama.cpp llama-server, BF16 GGUF, continuous batching, -np %d, 2 threads" % args.concurrency,
            "peer_tokens_per_s": round(peer["tokens_per_s"], 1), "peer_p95_ms": round(peer["p95_ms"]),
            "ratio_to_peer": round(ours_openai["tokens_per_s"] / peer["tokens_per_s"], 2),
            "peer_q4_1_tokens_per_s": round(peers["q4_1"]["tokens_per_s"], 1) if "tokens_per_s" in peers["q4_1"]
            else peers["q4_1"]["error"],
            "peer_failures": sum(p.get("failures", 0) for p in peers.values()),
        })
    for dtype, b in baselines.items():
        result[f"baseline_{dtype}_tokens_per_s"] = round(b["tokens_per_s"], 1)
        result[f"speedup_vs_{dtype}"] = round(ours["tokens_per_s"] / b["tokens_per_s"], 2)
        result[f"baseline_{dtype}_p95_ms"] = round(b["p95_ms"])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
