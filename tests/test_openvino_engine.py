"""The OpenVINO engine: our own export of a checkpoint to stateful IR, and serving through OpenVINO
GenAI's continuous-batching pipeline. Real parts: the embedded model exported for real, the real
pipeline, the engine's public API; transformers' forward is the reference.

The engine's behaviour tests (batching, stops, cancel, defaults, poisoned requests) run on both
engines in tests/test_serving_engine.py and tests/test_serving_safety_numerics.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selflearn import openvino_ir
from selflearn.prompting import render_prompt
from selflearn.serving.config import EngineOptions
from selflearn.serving.engine import Engine
from tests.support.engine import ask, generate

pytest.importorskip("openvino_genai")

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Name a large animal that lives in the sea."]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, embedded_model_dir):
    dest = tmp_path_factory.mktemp("ov") / "embedded"
    info = openvino_ir.export(embedded_model_dir, dest)
    return dest, info


def test_the_export_computes_transformers_logits(exported, embedded_model_dir):
    """The IR, run as the stateful model it is (prefill, then decode steps through its own KV
    variables), gives transformers' logits at every position: same next token everywhere, and
    values within f16 weight rounding."""
    import openvino as ov
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest, info = exported
    assert openvino_ir.is_exported(dest) and info["weights"] == "f16"
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    ids = render_prompt(tok, [{"role": "user", "content": QUESTIONS[0]}]) + tok.encode(" The capital is Paris.")
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    compiled = ov.Core().compile_model(str(dest / openvino_ir.MODEL_XML), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    split = len(ids) - 4  # the prompt at once, then four single-token steps on the cached past

    def run(chunk: list[int], start: int) -> np.ndarray:
        n = len(chunk)
        request.infer({"input_ids": np.array([chunk], dtype=np.int64),
                       "attention_mask": np.ones((1, start + n), dtype=np.int64),
                       "position_ids": np.arange(start, start + n, dtype=np.int64)[None],
                       "beam_idx": np.zeros(1, dtype=np.int32)})
        return request.get_tensor("logits").data[0].copy()

    request.reset_state()
    got = [run(ids[:split], 0)] + [run([ids[i]], i) for i in range(split, len(ids))]
    got_all = np.concatenate(got, 0)
    assert got_all.shape == want.shape
    assert (got_all.argmax(-1) == want.argmax(-1)).all()
    scale = np.abs(want).max()
    assert np.abs(got_all - want).max() < 0.02 * scale, np.abs(got_all - want).max()


def test_the_engine_answers_as_the_torch_engine_does():
    """Greedy answers on OpenVINO are the torch engine's (fp32) on the same prompts, through the
    whole engine: prompt rendering, the pipeline, streaming text, stop at end of turn. OpenVINO
    computes in bf16 with f16 weights, so a long answer may part from fp32 near a close call (one
    did after 21 words: "in the deep" / "in the depths"): each answer shares at least three
    quarters of its text with the torch engine's."""
    answers = {}
    for name in ("torch", "openvino"):
        engine = Engine(EngineOptions(dtype="fp32", torch_threads=2, max_new_tokens_cap=64))
        try:
            assert engine.configure({"engine": name}, wait=True)
            st = engine.status().weights
            assert st.ready and st.engine == name and not st.degraded
            answers[name] = [generate(engine, ask(q, max_new_tokens=24, temperature=0, repetition_penalty=1.0))
                             for q in QUESTIONS]
        finally:
            engine.shutdown()
    for ov_answer, torch_answer in zip(answers["openvino"], answers["torch"]):
        a, b = ov_answer.text, torch_answer.text
        shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert shared >= 0.75 * max(len(a), len(b)), (a, b)
    assert answers["openvino"][0].text == "The capital of France is Paris."
    assert answers["openvino"][0].finish_reason == "stop"
    assert all(d.checkpoint == "base:embedded:smollm2-135m-instruct" for d in answers["openvino"])


def test_seeded_sampling_repeats_and_seeds_differ():
    engine = Engine(EngineOptions(torch_threads=2, max_new_tokens_cap=32))
    try:
        engine.configure({"engine": "openvino"}, wait=True)
        params = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
        a = generate(engine, ask("Tell me a story.", seed=7, **params)).text
        b = generate(engine, ask("Tell me a story.", seed=7, **params)).text
        c = generate(engine, ask("Tell me a story.", seed=8, **params)).text
    finally:
        engine.shutdown()
    assert a == b and a != c


def test_a_model_it_cannot_export_is_refused_with_the_reason(tiny_opt_dir, tmp_path):
    """OPT is not of the Llama family: the exporter says so; an engine asked for openvino on it
    keeps what it serves and is degraded with that reason; `auto` serves it on torch."""
    with pytest.raises(ValueError, match="Llama family"):
        openvino_ir.export(tiny_opt_dir, tmp_path / "opt")
    assert not (tmp_path / "opt").exists()
    engine = Engine(EngineOptions(dtype="fp32", torch_threads=1, max_new_tokens_cap=8))
    try:
        engine.configure({"base_model": tiny_opt_dir}, wait=True)
        assert engine.status().weights.engine == "torch"
        engine.configure({"base_model": tiny_opt_dir, "engine": "openvino"}, wait=True)
        st = engine.status().weights
        assert st.ready and st.engine == "torch" and st.degraded
        assert "OpenVINO engine cannot serve this model" in st.degraded_reason
        assert "Llama family" in st.degraded_reason
        assert generate(engine, ask("hi", max_new_tokens=2)).finish_reason in ("stop", "length")
    finally:
        engine.shutdown()


def test_a_round_publishes_its_ir_and_a_replica_serves_it_without_converting(learned_round, s3_server, tmp_path):
    """The trainer exports at publish: the IR's files are in the manifest with their sha256, a
    trainer fetching the checkpoint as a parent skips them, and a replica loads them as published
    (its serving cache gets no export of its own)."""
    from selflearn.trainer.model_io import fetch_checkpoint

    endpoint, _ = s3_server
    store = learned_round.store
    ref = store.ref_for_uri(learned_round.result.checkpoint)
    files = store.manifest(ref)["files"]
    ir = {k: v for k, v in files.items() if k.startswith(openvino_ir.CHECKPOINT_SUBDIR + "/")}
    assert {f"openvino/{openvino_ir.MODEL_XML}", "openvino/openvino_model.bin", f"openvino/{openvino_ir.MARKER}",
            "openvino/openvino_tokenizer.xml", "openvino/openvino_detokenizer.xml"} <= set(ir)
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in ir.values())

    fetch_checkpoint(ref, store, tmp_path / "parent")
    assert (tmp_path / "parent" / "model.safetensors").is_file()
    assert not (tmp_path / "parent" / openvino_ir.CHECKPOINT_SUBDIR).exists()

    cache = tmp_path / "serving-cache"
    engine = Engine(EngineOptions(torch_threads=2, max_new_tokens_cap=16, cache_dir=str(cache)))
    try:
        engine.configure({"checkpoint": ref.uri, "storage_endpoint": endpoint}, wait=True)
        st = engine.status().weights
        assert st.ready and st.engine == "openvino" and st.checkpoint == ref.id and not st.degraded
        assert generate(engine, ask("What is the capital of France?", max_new_tokens=8)).checkpoint == ref.id
    finally:
        engine.shutdown()
    assert not (cache / "openvino").exists(), "the replica converted instead of loading the published IR"


@pytest.mark.parametrize("scheme", ["int8", "q4"])
def test_quantized_weights_load_smaller_and_answer(tiny_llama_dir, tmp_path, scheme):
    """`quantization` on the OpenVINO engine: the IR is quantised once into the serving cache, its
    weights file is smaller than the f16 one, the engine answers on it and says which it serves."""
    cache = tmp_path / "cache"
    engine = Engine(EngineOptions(torch_threads=2, max_new_tokens_cap=8, cache_dir=str(cache)))
    try:
        engine.configure({"base_model": tiny_llama_dir, "engine": "openvino", "quantization": scheme}, wait=True)
        st = engine.status().weights
        assert st.ready and st.engine == "openvino" and st.dtype == scheme and not st.degraded, st
        assert generate(engine, ask("hi", max_new_tokens=4, temperature=0)).finish_reason in ("stop", "length")
    finally:
        engine.shutdown()
    dirs = {p.name: p for p in (cache / "openvino").iterdir() if p.is_dir() and not p.name.startswith(".")}
    quantized = next(p for n, p in dirs.items() if n.endswith(f"-{scheme}"))
    plain = next(p for n, p in dirs.items() if not n.endswith(f"-{scheme}"))
    size = (lambda d: (d / "openvino_model.bin").stat().st_size)
    assert size(quantized) < 0.75 * size(plain)


def test_quantization_needs_the_openvino_engine_and_a_known_scheme(tiny_opt_dir, tmp_path):
    from selflearn.serving.config import parse_model_config

    with pytest.raises(ValueError, match="quantization"):
        parse_model_config({"quantization": "int3"})
    with pytest.raises(ValueError, match="unknown quantization"):
        openvino_ir.quantize(tmp_path, tmp_path / "out", "int3")
    engine = Engine(EngineOptions(dtype="fp32", torch_threads=1, max_new_tokens_cap=8))
    try:
        engine.configure({"base_model": tiny_opt_dir, "quantization": "int8"}, wait=True)
        st = engine.status().weights
        assert not st.ready and st.degraded
        assert "quantization 'int8' needs the OpenVINO engine" in st.degraded_reason
    finally:
        engine.shutdown()


def test_each_engine_downloads_only_what_it_serves(learned_round, s3_server, tmp_path):
    """A replica on OpenVINO fetches the checkpoint's IR and not its HF weights (a third of the
    bytes: the swap's cost); one on torch the weights and not the IR."""
    from selflearn.serving import loader

    endpoint, _ = s3_server
    uri = learned_round.result.checkpoint
    for engine, has, lacks in (("openvino", "openvino/openvino_model.bin", "model.safetensors"),
                               ("torch", "model.safetensors", "openvino/openvino_model.bin")):
        cfg = loader.ModelConfig(checkpoint=uri, storage_endpoint=endpoint, engine=engine)
        path, _, _ = loader.fetch_checkpoint(cfg, EngineOptions(cache_dir=str(tmp_path / engine)))
        assert (path / has).is_file() and not (path / lacks).exists(), engine
