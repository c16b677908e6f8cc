"""Rollout and knowledge uptake of `selflearn local` on this machine.

Serves the base model on a local Ray Serve, fires /chat requests continuously from a client
thread while the driver runs rounds (trainer subprocess -> policy -> promote -> hot swap), then
measures, with the promoted checkpoint after the last round against the base model:

* failed_requests / total_requests: every request during the rounds, any non-200 counts;
* publish_to_serve_s: the slowest promoted round, from manifest publication (`published_at`)
  to the first /chat answer carrying the new checkpoint id;
* ppl_learned_drop: 1 - ppl(final, articles learned in all rounds) / ppl(base, same);
* ppl_general_rise: ppl(final, fixed general set) / ppl(base, same) - 1.

Prints progress to stderr and one JSON object as its last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline env defaults)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load(threading.Thread):
    """Sequential /chat requests (plus a 2nd concurrent client) until stopped; records every answer."""

    def __init__(self, url: str, clients: int = 2):
        super().__init__(daemon=True)
        self.url, self.clients = url, clients
        self.stop = threading.Event()
        self.answers: list[tuple[float, str | None]] = []  # (time, checkpoint) per success
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def client(self, i: int) -> None:
        import httpx

        with httpx.Client(timeout=120) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    r = http.post(f"{self.url}/chat", json={"message": f"Tell me one fact ({i}.{n}).",
                                                            "max_length": 12, "temperature": 0})
                    with self.lock:
                        if r.status_code == 200:
                            self.answers.append((time.time(), r.json().get("checkpoint")))
                        else:
                            self.failures.append(f"{r.status_code} {r.text[:200]}")
                except Exception as err:  # a dropped connection is a failed request too
                    with self.lock:
                        self.failures.append(f"{type(err).__name__}: {err}")
                time.sleep(0.2)

    def run(self) -> None:
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def perplexities(config, store, checkpoint_uri: str | None, texts: dict[str, list[str]]) -> dict[str, float]:
    import torch

    from selflearn.trainer import data, loop
    from selflearn.trainer.model_io import load_for_training

    spec = config.spec
    with tempfile.TemporaryDirectory() as tmp:
        ref = store.ref_for_uri(checkpoint_uri) if checkpoint_uri else None
        model, tok = load_for_training(spec, ref, store, Path(tmp) / "m", torch.device("cpu"))
        out = {}
        with torch.no_grad():
            for name, t in texts.items():
                b = data.batches(data.pack(data.tokenize(tok, t), spec.training.max_length, tok.eos_token_id), 4)
                out[name] = loop.perplexity(model, b, "bf16")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--articles", type=int, default=16, help="articles per round")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: selflearn local's)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="keep the run here (default: a temporary dir)")
    a = p.parse_args()

    from selflearn.local.cli import LOCAL_TRAINING
    from selflearn.local.driver import LocalDriver
    from selflearn.local.events import LocalEvent, RoundRecorded
    from selflearn.local.serving import start_serving, stop_serving
    from selflearn.sources.snapshot import general_set
    from selflearn.spec import RunConfig, parse_spec

    tmp = tempfile.TemporaryDirectory(prefix="selflearn-rollout-")
    d = Path(a.data_dir or tmp.name).resolve()
    training = dict(LOCAL_TRAINING)
    for key, val in (("learningRate", a.lr), ("epochs", a.epochs), ("maxLength", a.max_length)):
        if val is not None:
            training[key] = val
    config = RunConfig(name="bench", spec=parse_spec({
        "sources": [{"snapshot": {"language": "en", "articlesPerRound": a.articles}}],
        "training": training, "storage": {"uri": f"file://{d / 'checkpoints'}"},
        "promotion": {"maxPerplexityIncrease": 0.02}}))

    def event(ev: LocalEvent) -> None:
        if isinstance(ev, RoundRecorded):
            rec = ev.record
            print(f"round {rec.round}: {rec.reason} (publish->serve {rec.publish_to_serve_s}s)", file=sys.stderr,
                  flush=True)

    driver = LocalDriver(config, d, on_event=event)
    driver.prepare()
    t0 = time.time()
    server = start_serving(driver, port=free_port(), serving=None)
    print(f"serving base after {time.time() - t0:.1f}s at {server.url}", file=sys.stderr, flush=True)
    load = Load(server.url)
    load.start()
    try:
        state = driver.loop(rounds=a.rounds, interval=0)
        time.sleep(2)  # a few answers from the last swap
    finally:
        load.stop.set()
        load.join(timeout=150)
        stop_serving(server)

    publish_to_serve = []
    first_answer = {}
    for t, ck in load.answers:
        first_answer.setdefault(ck, t)
    for rec in state.rounds:
        if rec.promoted and rec.published_at and rec.id in first_answer:
            publish_to_serve.append(first_answer[rec.id] - rec.published_at)

    store = driver.store
    learned: list[str] = []
    for rec in state.rounds:
        if rec.status != "published" or not rec.checkpoint:
            continue
        ref = store.ref_for_uri(rec.checkpoint)
        raw = store.checkpoint_file(ref, "articles.jsonl") or b""
        learned += [json.loads(x)["text"] for x in raw.decode().splitlines() if x.strip()]
    general = [x.text for x in general_set("en", config.spec.training.general_articles)]
    texts = {"learned": learned, "general": general}
    base = perplexities(config, store, None, texts)
    final = perplexities(config, store, state.promoted, texts) if state.promoted else base
    out = {
        "failed_requests": len(load.failures),
        "total_requests": len(load.answers) + len(load.failures),
        "publish_to_serve_s": round(max(publish_to_serve), 2) if publish_to_serve else None,
        "publish_to_serve_each_s": [round(x, 2) for x in publish_to_serve],
        "ppl_learned_drop": round(1 - final["learned"] / base["learned"], 4),
        "ppl_general_rise": round(final["general"] / base["general"] - 1, 4),
        "ppl_learned_base": round(base["learned"], 3), "ppl_learned_final": round(final["learned"], 3),
        "ppl_general_base": round(base["general"], 3), "ppl_general_final": round(final["general"], 3),
        "rounds": len(state.rounds), "promoted_rounds": [r.round for r in state.rounds if r.promoted],
        "final_checkpoint": state.promoted_id, "articles_learned": len(learned),
        "failures_sample": load.failures[:3], "wall_s": round(time.time() - t0, 1),
    }
    tmp.cleanup()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
