"""One user's request never fails another's: sampling parameters that float32 turns into 0 or
infinity, and the context error's body.

`top_p: 1e-300`, `temperature: 1e-40` and `repetition_penalty: 1e-40` pass validation; before the
guards in `selflearn/serving/sampling.py` they made `torch.multinomial` raise for the whole batch,
so every request sharing the poisoned one's prefill group was answered 500. Real parts: the
sampler on real tensors, and the real app (`build_api` + `EngineBackend(Engine)`) on the tiny OPT
served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from selflearn.serving.config import EngineOptions, ServeSettings
from selflearn.serving.engine import Engine
from selflearn.serving.sampling import repetition_penalty, sample
from tests.support.engine import serve_api
from tests.support.waiting import wait_until

F32 = torch.finfo(torch.float32)
SUBNORMAL = 1.4e-45  # float32's smallest positive value


# -- the sampler as it was before the float32 guards: normal rows must sample exactly as here ---------
def _reference_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    if not bool((penalty != 1).any()):
        return logits
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def _reference_sample(logits, temperature, top_k, top_p, generators) -> torch.Tensor:
    out = logits.argmax(-1)
    rows = (temperature > 0).nonzero().flatten()
    if rows.numel() == 0:
        return out
    scaled = logits[rows] / temperature[rows, None]
    vocab = scaled.shape[-1]
    k = top_k[rows]
    k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
    kmax = int(k.max())
    vals, idx = scaled.topk(kmax, dim=-1)
    ranks = torch.arange(kmax, device=vals.device)
    vals = vals.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = vals.softmax(-1)
    before = probs.cumsum(-1) - probs
    vals = vals.masked_fill(before >= top_p[rows, None], float("-inf"))
    probs = vals.softmax(-1)
    gens = [generators[int(r)] for r in rows]
    if any(g is not None for g in gens):
        choice = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
    else:
        choice = torch.multinomial(probs, 1).flatten()
    out[rows] = idx.gather(-1, choice[:, None]).flatten()
    return out


# -- a batch: rows of (temperature, top_p, top_k, repetition_penalty) ---------------------------------
VOCAB = 96
NORMAL = [(0.7, 0.9, 50, 1.1), (1.0, 1.0, 0, 1.0), (0.0, 1.0, 0, 1.1), (1.3, 0.5, 10, 1.3)]
POISONS = {
    "top_p 1e-300": (0.8, 1e-300, 0, 1.1),
    "temperature 1e-40": (1e-40, 0.9, 0, 1.1),
    "repetition_penalty 1e-40": (0.8, 0.9, 0, 1e-40),
    "float32's smallest value everywhere": (SUBNORMAL, SUBNORMAL, 0, SUBNORMAL),
    "a penalty float32 rounds to 0, temperature just above greedy": (2e-5, 1.0, 0, 1e-50),
    "the largest top_k, temperature and penalty": (2.0, 1.0, 100_000, 10.0),
    "logits at float32's max": (0.5, 0.9, 0, 1.1),
}


def _batch(rows: list[tuple], seed: int = 0, extreme_rows: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(rows), VOCAB, generator=g) * 4
    for i in extreme_rows:  # some tokens at float32's max, some at -inf: the softmax overflows
        logits[i, :3], logits[i, 3:6] = F32.max, float("-inf")
    seen = torch.rand(len(rows), VOCAB, generator=g) < 0.2
    cols = list(zip(*rows))
    return (logits, seen, torch.tensor(cols[0], dtype=torch.float32), torch.tensor(cols[1], dtype=torch.float32),
            torch.tensor(cols[2], dtype=torch.long), torch.tensor(cols[3], dtype=torch.float32))


def _draw(fn_pen, fn_sample, batch, seeds: list[int] | None) -> torch.Tensor:
    """One sampling step as `Batch.sample_and_push` runs it: per-row generators, or the global RNG."""
    logits, seen, temp, top_p, top_k, pen = batch
    if seeds is None:
        torch.manual_seed(1234)
        gens = [None] * len(temp)
    else:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
    return fn_sample(fn_pen(logits.clone(), seen, pen), temp, top_k, top_p, gens)


def _benign(row: tuple) -> tuple:
    """What the reference runs instead of a poisoned row: the same draw of randomness (sampled or
    greedy, the same top_k), with values it can handle."""
    temperature, _, top_k, _ = row
    return (temperature if temperature >= 1e-5 else 0.0, 1.0, top_k, 1.0)


@pytest.mark.parametrize("name", list(POISONS))
@pytest.mark.parametrize("seeds", [[11, 12, 13, 14, 15], None], ids=["seeded", "global-rng"])
def test_a_poisoned_row_neither_raises_nor_moves_the_others(name, seeds):
    rows = [NORMAL[0], POISONS[name], *NORMAL[1:]]
    extreme = (1,) if name == "logits at float32's max" else ()
    got = _draw(repetition_penalty, sample, _batch(rows, extreme_rows=extreme), seeds)

    reference = _draw(_reference_penalty, _reference_sample, _batch([NORMAL[0], _benign(rows[1]), *NORMAL[1:]]),
                      seeds)
    normal = [0, 2, 3, 4]
    assert got[normal].tolist() == reference[normal].tolist()
    token = int(got[1])
    assert 0 <= token < VOCAB
    logits, seen, *_ = _batch(rows, extreme_rows=extreme)
    if name in ("top_p 1e-300", "temperature 1e-40"):
        # Greedy: only the first candidate survives a top_p of 0; a temperature of 1e-40 is 0.
        assert token == int(_reference_penalty(logits, seen, torch.tensor([1.1] * 5))[1].argmax())
    if name == "repetition_penalty 1e-40":
        # A penalty below 1 favours what was said, as in transformers: here the likeliest of it.
        assert token == int(logits[1].masked_fill(~seen[1], float("-inf")).argmax())
    if name == "logits at float32's max":
        assert token in (0, 1, 2)


def test_every_poison_in_one_batch_with_every_normal_row():
    rows = [*NORMAL, *POISONS.values(), *NORMAL]
    extreme = (len(NORMAL) + list(POISONS).index("logits at float32's max"),)
    for seeds in (list(range(len(rows))), None):
        got = _draw(repetition_penalty, sample, _batch(rows, seed=3, extreme_rows=extreme), seeds)
        assert ((got >= 0) & (got < VOCAB)).all()
        benign = [*NORMAL, *(_benign(r) for r in POISONS.values()), *NORMAL]
        reference = _draw(_reference_penalty, _reference_sample, _batch(benign, seed=3), seeds)
        normal = list(range(len(NORMAL))) + list(range(len(rows) - len(NORMAL), len(rows)))
        assert got[normal].tolist() == reference[normal].tolist()


def test_ordinary_values_sample_as_before():
    rnd = random.Random(5)
    for trial in range(40):
        rows = [(rnd.choice([0.0, rnd.uniform(0.05, 2.0)]), rnd.uniform(0.05, 1.0), rnd.choice([0, 1, 5, 40, 200]),
                 rnd.uniform(0.5, 2.0)) for _ in range(rnd.randint(1, 8))]
        batch = _batch(rows, seed=trial)
        for seeds in ([rnd.randrange(1 << 30) for _ in rows], None):
            assert _draw(repetition_penalty, sample, batch, seeds).tolist() == \
                _draw(_reference_penalty, _reference_sample, batch, seeds).tolist()


def test_a_real_vocabulary_samples_as_the_full_sort_does():
    """With the embedded model's 49,152 tokens the sampler looks at a row's best 256 first (a whole
    sort per row was most of a sampled step): a seeded top-p row draws the very token the full sort
    draws, whether its nucleus fits those 256 (peaked logits) or not (flat ones)."""
    vocab = 49_152
    g = torch.Generator().manual_seed(7)
    scales = torch.tensor([0.5, 1.0, 4.0, 8.0, 12.0, 6.0])
    for trial in range(10):
        logits = torch.randn(6, vocab, generator=g) * scales[:, None]
        temp = torch.tensor([0.7, 0.7, 0.7, 0.5, 1.0, 0.7])
        top_p = torch.tensor([0.9, 0.95, 0.9, 0.5, 0.99, 0.3])
        top_k = torch.tensor([0, 0, 0, 0, 0, 300])
        seeds = [trial * 6 + i for i in range(6)]
        got = sample(logits, temp, top_k, top_p, [torch.Generator().manual_seed(s) for s in seeds])
        want = _reference_sample(logits, temp, top_k, top_p, [torch.Generator().manual_seed(s) for s in seeds])
        assert got.tolist() == want.tolist()


def test_a_row_that_truncates_nothing_draws_from_the_whole_distribution():
    """temperature alone (top_p 1, no top_k), as many OpenAI clients send it: the draw follows the
    softmax, tail included, without sorting the vocabulary."""
    vocab = 4096
    logits = torch.full((1, vocab), -2.0)
    logits[0, :3] = torch.tensor([2.0, 1.0, 0.0])
    probs = logits.softmax(-1)[0]
    gen = torch.Generator().manual_seed(3)
    n = 4000
    counts = torch.zeros(vocab)
    for _ in range(n):
        tok = sample(logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]), [gen])
        counts[int(tok)] += 1
    for t in range(3):
        assert abs(counts[t] / n - probs[t]) < 0.03, (t, counts[t] / n, probs[t])
    assert abs(counts[3:].sum() / n - probs[3:].sum()) < 0.03  # the long tail keeps its share


def test_a_penalty_that_would_overflow_is_floored_and_clamped_to_float32():
    logits = torch.tensor([[3e38, -3e38, float("-inf"), 0.0, 1.0, 2.0, 3.0]])
    seen = torch.tensor([[True, True, True, True, True, True, False]])
    for tiny_penalty in (1e-40, 1e-50):  # float32: a subnormal, and 0
        tiny = repetition_penalty(logits, seen, torch.tensor([tiny_penalty]))[0]
        assert tiny[0] == F32.max  # past float32's max even with the floor: clamped
        assert tiny[4] < tiny[5] < F32.max  # ordinary logits keep their order, finite
        assert tiny[6] == 3.0 and tiny[3] == 0.0 and tiny[2] == float("-inf")  # unseen; 0; -inf stays
        assert -1e6 < tiny[1] < 0
    big = repetition_penalty(logits, seen, torch.tensor([10.0]))[0]
    assert big[1] == -F32.max and big[0] == pytest.approx(3e37) and big[2] == float("-inf")


# -- the real app in process --------------------------------------------------------------------------
class Gate:
    """Holds the model's forward passes while the test lines requests up in the engine's queue, so
    that they are prefilled together as one group: the case that failed every request in it."""

    def __init__(self):
        self.open = threading.Event()
        self.open.set()
        self.held = threading.Event()

    def hook(self, module, args) -> None:
        if not self.open.is_set():
            self.held.set()
            self.open.wait(60)

    def close(self) -> None:
        self.held.clear()
        self.open.clear()


def _serve(engine: Engine, settings: ServeSettings) -> contextlib.AbstractContextManager[str]:
    from selflearn.serving.backend import EngineBackend
    from selflearn.serving.http import build_api

    return serve_api(build_api(EngineBackend(engine), settings))


ENGINE = {"max_new_tokens_cap": 64, "max_context_tokens": 128}  # the tiny OPT's own context is 256


class _GatedPipeline:
    """An OpenVINO pipeline whose steps wait at the gate, as the torch model's forward does."""

    def __init__(self, pipeline, gate: Gate):
        self._pipeline, self._gate = pipeline, gate

    def step(self) -> None:
        self._gate.hook(None, None)
        self._pipeline.step()

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


@pytest.fixture(scope="module", params=["torch", "openvino"])
def served(request, tiny_opt_dir, tiny_llama_dir):
    """The app on each engine (each samples on its own): the tiny OPT on torch, the tiny Llama on
    OpenVINO (it exports the Llama family only)."""
    from selflearn.serving import loader

    if request.param == "openvino":
        pytest.importorskip("openvino_genai")
    gate = Gate()

    def load(cfg, options):
        lm = loader.load(cfg, options)
        if lm.pipeline is not None:
            lm.pipeline = _GatedPipeline(lm.pipeline, gate)
        else:
            lm.model.register_forward_pre_hook(gate.hook)
        return lm

    engine = Engine(EngineOptions(dtype="fp32", torch_threads=1, max_batch_size=16, **ENGINE), load=load)
    model = tiny_opt_dir if request.param == "torch" else tiny_llama_dir
    engine.configure({"base_model": model, "engine": request.param}, wait=True)
    assert engine.status().weights.engine == request.param
    try:
        with _serve(engine, ServeSettings(engine=ENGINE)) as url:
            yield url, engine, gate
    finally:
        gate.open.set()
        engine.shutdown()


def _body(route: str, message: str, **sampling) -> dict:
    if route == "/v1/chat/completions":
        return {"model": "selflearn", "messages": [{"role": "user", "content": message}], "max_tokens": 8, **sampling}
    return {"message": message, "max_length": 8, **sampling}


def _post(url: str, route: str, body: dict) -> tuple[int, str]:
    with httpx.stream("POST", url + route, json=body, timeout=60) as r:
        return r.status_code, r.read().decode()


def _answered(route: str, status: int, text: str) -> bool:
    if status != 200:
        return False
    if route == "/chat/stream":
        return "event: done" in text and "event: error" not in text
    doc = json.loads(text)
    reason = doc["choices"][0]["finish_reason"] if route.startswith("/v1") else doc["finish_reason"]
    return reason in ("stop", "length")


def _idle(engine: Engine) -> bool:
    st = engine.status()
    return st.running == 0 and st.queue_depth == 0


ROUTES = ["/chat", "/v1/chat/completions", "/chat/stream"]
HTTP_POISONS = {"top_p": 1e-300, "temperature": 1e-40, "repetition_penalty": 1e-40}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("poison", list(HTTP_POISONS))
def test_a_poisoned_request_in_a_burst_fails_nobody(served, route, poison):
    url, engine, gate = served
    wait_until(lambda: _idle(engine), timeout=30, what="the engine to be idle")
    errors = engine.status().counters.step_errors
    normal = {"temperature": 0.8, "top_p": 0.9}
    burst = [_body(route, f"hello {i}", seed=i, **normal) for i in range(4)]
    burst.append(_body(route, "hello", **{**normal, poison: HTTP_POISONS[poison]}))
    gate.close()
    try:
        with ThreadPoolExecutor(len(burst) + 1) as pool:
            first = pool.submit(_post, url, route, _body(route, "first", **normal))
            wait_until(gate.held.is_set, timeout=30, what="the first request to reach the model")
            sent = [pool.submit(_post, url, route, b) for b in burst]
            wait_until(lambda: engine.status().queue_depth == len(burst), timeout=30,
                       what="the burst to queue up as one prefill group")
            gate.open.set()
            results = [f.result(timeout=120) for f in [first, *sent]]
    finally:
        gate.open.set()
    for status, text in results:
        assert _answered(route, status, text), (status, text[:500])
    assert engine.status().counters.step_errors == errors


@pytest.mark.parametrize("route,param", [("/chat", "message"), ("/chat/stream", "message"),
                                         ("/v1/chat/completions", "messages")])
def test_a_prompt_that_cannot_fit_names_the_effective_context(served, route, param):
    url, engine, _ = served
    status, text = _post(url, route, _body(route, "word " * 150))
    assert status == 422, text
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded"
    assert error["param"] == param
    # max_context_tokens (128), not the model's own 256.
    assert "128-token context" in error["message"] and "256" not in error["message"]
    assert "8 new tokens" in error["message"]


def test_an_openai_stream_ends_with_an_error_in_the_documented_shape(served):
    """A failure after the stream started (here the request timeout) ends it with the error body
    every other error has: message, type, param, code."""
    _, engine, gate = served
    wait_until(lambda: _idle(engine), timeout=30, what="the engine to be idle")
    gate.close()
    try:
        with _serve(engine, ServeSettings(engine=ENGINE, request_timeout_s=0.5)) as url:
            status, text = _post(url, "/v1/chat/completions", {**_body("/v1/chat/completions", "hi"), "stream": True})
    finally:
        gate.open.set()
    assert status == 200
    chunks = [json.loads(line[len("data: "):]) for line in text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[-1] == {"error": {"message": "the request timed out after 0.5s", "type": "timeout",
                                    "param": None, "code": "timeout"}}
    wait_until(lambda: _idle(engine), timeout=30, what="the timed-out request to free its slot")
