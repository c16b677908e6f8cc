"""Hot swap through real Ray Serve: `LocalServe.update_checkpoint` while clients keep asking.

Checkpoints are the embedded model published (bf16) to a file:// store with CheckpointStore, so
the replica downloads, verifies and loads them exactly as it would from S3.
"""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest

from selflearn.checkpoints import CheckpointStore
from selflearn.serving.app import APP_NAME, deploy
from tests.support.serving import parse_sse
from tests.support.waiting import wait_until

EMBEDDED = "embedded:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def published(srv, tmp_path_factory):
    import torch

    from selflearn import basemodel

    src = tmp_path_factory.mktemp("ckpt-src")
    basemodel.load_model(EMBEDDED, dtype=torch.bfloat16).save_pretrained(src)
    basemodel.load_tokenizer(EMBEDDED).save_pretrained(src)
    store = CheckpointStore.from_uri(srv.store_uri)
    refs = [store.publish("swaptest", r, src, {"base_model": EMBEDDED}) for r in (1, 2, 3)]
    yield store, refs
    srv.server.update_checkpoint({})  # leave the shared server on the base model
    srv.server.wait_for_checkpoint(f"base:{EMBEDDED}", timeout=180)


def wait(pred, timeout: float, what: str):
    return wait_until(pred, timeout=timeout, what=what, interval=0.1)


def test_swap_twice_under_load_drops_nothing(srv, published):
    _, refs = published
    records: list[tuple[float, float, int, str | None]] = []  # sent, answered, status, checkpoint
    streams: list[tuple[str, str]] = []  # (checkpoint at start, checkpoint at done)
    stop = threading.Event()

    def chat_client(i: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/chat", json={"message": f"Say one word about {i}.", "max_length": 4})
                    ck = r.headers.get("x-model-checkpoint")
                    assert r.status_code != 200 or r.json()["checkpoint"] == ck
                    records.append((t0, time.monotonic(), r.status_code, ck))
                except httpx.HTTPError:
                    records.append((t0, time.monotonic(), 599, None))

    def stream_client() -> None:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            while not stop.is_set():
                with c.stream("POST", "/chat/stream", json={"message": "Count to twenty.", "max_length": 24}) as r:
                    events = parse_sse(r.read().decode()) if r.status_code == 200 else []
                if events:
                    streams.append((events[0][1]["checkpoint"], events[-1][1].get("checkpoint")))
                else:
                    streams.append(("failed", str(r.status_code)))

    threads = [threading.Thread(target=chat_client, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=stream_client))
    for t in threads:
        t.start()
    firsts, updates = [], []
    try:
        wait(lambda: len(records) >= 3, 60, "traffic")
        for ref in refs[:2]:
            t0 = time.monotonic()
            updates.append(t0)
            srv.server.update_checkpoint({"checkpoint": ref.uri, "base_model": EMBEDDED})
            first = wait(lambda: min((done for _, done, code, ck in records if ck == ref.id and done > t0),
                                     default=None), 240, f"an answer from {ref.id}")
            firsts.append(first)
            wait(lambda: sum(1 for sent, *_ in records if sent > first) >= 6, 60, "traffic after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    failed = [r for r in records if r[2] != 200]
    assert not failed, failed
    assert len(records) >= 20
    # Once an answer from the new checkpoint is out, every request sent later gets it (until the
    # next update_checkpoint).
    ids = [r.id for r in refs[:2]]
    for i, first in enumerate(firsts):
        end = updates[i + 1] if i + 1 < len(updates) else float("inf")
        later = {ck for sent, _, _, ck in records if first < sent < end}
        assert later == {ids[i]}, (ids[i], later)
    # Streams finish on the weights they started on; none failed.
    assert streams and all(start == done for start, done in streams), streams
    assert srv.server.status().weights.checkpoint == ids[-1]


def test_corrupt_checkpoint_and_bad_config_keep_serving_old_weights(srv, published):
    store, refs = published
    serving = srv.server.status().weights.checkpoint
    assert serving == refs[1].id
    weights = store.backend.root / "swaptest" / "r000003" / "model.safetensors"
    with open(weights, "r+b") as f:  # flip one byte in the middle of the weights
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = srv.server.status().counters.swap_failures
    srv.server.update_checkpoint({"checkpoint": refs[2].uri})
    with pytest.raises(RuntimeError, match="sha256"):
        srv.server.wait_for_checkpoint(refs[2].id, timeout=180)
    st = srv.server.status()
    assert st.weights.checkpoint == serving and st.weights.degraded and st.counters.swap_failures == before + 1

    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/chat", json={"message": "Still there?", "max_length": 3})
        assert r.status_code == 200 and r.headers["x-model-checkpoint"] == serving
        ready = c.get("/readyz").json()
        assert ready["ready"] and ready["degraded"] and ready["checkpoint"] == serving
        assert "sha256" in c.get("/status").json()["model"]["last_swap_error"]
        metrics = c.get("/metrics").text
        assert f"selflearn_swap_failures_total {before + 1}.0" in metrics
        assert "selflearn_model_degraded 1.0" in metrics

        # A malformed user_config that gets past the client (as a hand-edited RayService could):
        # recorded as a failed swap, the replica lives on.
        config = copy.deepcopy(srv.server.config)
        app = next(a for a in config["applications"] if a["name"] == APP_NAME)
        app["deployments"][0]["user_config"] = {"checkpoint": "not-a-uri", "surprise": True}
        deploy(config)
        wait(lambda: srv.server.status().counters.swap_failures == before + 2, 60, "the bad config to be recorded")
        st = srv.server.status()
        assert "surprise" in st.counters.last_swap_error and st.weights.checkpoint == serving
        assert c.post("/chat", json={"message": "And now?", "max_length": 2}).headers["x-model-checkpoint"] == serving
