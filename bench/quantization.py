"""What each `user_config.quantization` costs and gives, on the OpenVINO engine (issue 28, step 3).

    .venv/bin/python bench/quantization.py            # ~4 minutes on 2 CPU cores

For the embedded model exported as the trainer publishes it (f16 IR) and quantised as a replica
does at load (`openvino_ir.quantize`: none, int8, q4), one run, same machine:

* perplexity on the trainer's general set (16 offline-Wikipedia articles, 512-token blocks) and
  of the chat-retention references (their answer tokens after their prompts), computed by the
  trainer's own `loop.perplexity` over the IR (compiled as the CPU plugin serves it: bf16 where
  the CPU has it), and each one's change against `none`;
* the knowledge probe, closed book: greedy answers through the engine to the probe's questions
  about the general set's articles, scored as the gate scores them;
* decode throughput through the engine, 16 prompts x 64 new tokens sampled (temperature 0.7,
  top_p 0.9), and the IR's size.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402,F401  (offline env defaults)

PROMPTS = [f"Tell me about the number {i}." for i in range(16)]


class _IrForward:
    """The IR under `loop.perplexity`'s calls: `model(input_ids=, labels=).loss`, HF's shifted mean."""

    training = False

    def __init__(self, ir_dir: Path):
        import openvino as ov

        from selflearn import openvino_ir

        compiled = ov.Core().compile_model(str(ir_dir / openvino_ir.MODEL_XML), "CPU", {"KV_CACHE_PRECISION": "f16"})
        self.request = compiled.create_infer_request()

    def parameters(self):
        import torch

        yield torch.zeros(1)

    def eval(self) -> None:
        pass

    def train(self) -> None:
        pass

    def __call__(self, input_ids, labels):
        import numpy as np
        import torch

        b, t = input_ids.shape
        self.request.reset_state()
        self.request.infer({"input_ids": input_ids.numpy(), "attention_mask": np.ones((b, t), dtype=np.int64),
                            "position_ids": np.arange(t, dtype=np.int64)[None].repeat(b, 0),
                            "beam_idx": np.arange(b, dtype=np.int32)})
        logits = torch.from_numpy(self.request.get_tensor("logits").data.copy()).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss)


def perplexities(ir_dir: Path, tok) -> dict:
    from selflearn.sources.snapshot import general_set
    from selflearn.trainer import data, loop, probe

    general = [tok(a.text, add_special_tokens=False)["input_ids"] for a in general_set("en", 16)]
    blocks = data.batches(data.pack(general, 512, tok.eos_token_id), 4)
    model = _IrForward(ir_dir)
    items = probe.chat_references(probe.RETENTION_FILE)["items"]
    return {"general_ppl": loop.perplexity(model, blocks),
            "retention_ppl": loop.perplexity(model, probe.reference_batches(tok, items, 512))}


def engine_figures(scheme: str, checkpoint_dir: Path) -> dict:
    from selflearn.serving.config import EngineOptions
    from selflearn.serving.engine import Engine
    from selflearn.sources.snapshot import general_set
    from selflearn.trainer import probe
    from tests.support.engine import ask, generate, submit

    questions = [q for i, a in enumerate(general_set("en", 16)) for q in probe.questions_for(a, offset=i)]
    engine = Engine(EngineOptions(max_new_tokens_cap=64, cache_dir=str(checkpoint_dir / "cache")))
    try:
        t0 = time.perf_counter()
        engine.configure({"engine": "openvino", "quantization": scheme,
                          "checkpoint": f"file://{checkpoint_dir / 'store'}/bench/r000001"}, wait=True)
        load_s = time.perf_counter() - t0
        st = engine.status().weights
        assert st.ready and st.engine == "openvino" and not st.degraded, st
        scores = [q.score(generate(engine, ask(q.prompt, max_new_tokens=48, temperature=0,
                                               repetition_penalty=1.0)).text) for q in questions]
        runs = [submit(engine, ask(p, max_new_tokens=64, temperature=0.7, top_p=0.9)) for p in PROMPTS]
        t1 = time.perf_counter()
        for r in runs:
            assert r.ended.wait(300)
        wall = time.perf_counter() - t1
        tokens = sum(r.end.usage["completion_tokens"] for r in runs)
    finally:
        engine.shutdown()
    return {"knowledge_general": sum(scores) / len(scores), "questions": len(scores),
            "tokens_per_s": tokens / wall, "load_s": load_s}


def main() -> None:
    from selflearn import basemodel, openvino_ir
    from selflearn.checkpoints import CheckpointStore

    tmp = Path(tempfile.mkdtemp(prefix="selflearn-quant-"))
    src = Path(basemodel.materialize_embedded())
    ir = tmp / "ir-none"
    openvino_ir.export(src, ir)
    tok = basemodel.load_tokenizer(str(src))
    # A published checkpoint (HF weights + IR) for the engine runs, as a round leaves one.
    ckpt = tmp / "ckpt"
    import shutil

    shutil.copytree(src, ckpt)
    shutil.copytree(ir, ckpt / openvino_ir.CHECKPOINT_SUBDIR)
    CheckpointStore.from_uri(f"file://{tmp / 'store'}").publish("bench", 1, ckpt, {"base_model": basemodel.EMBEDDED_MODEL})

    out: dict = {"model": basemodel.EMBEDDED_MODEL}
    for scheme in openvino_ir.QUANTIZATIONS:
        d = ir if scheme == "none" else tmp / f"ir-{scheme}"
        t0 = time.perf_counter()
        if scheme != "none":
            openvino_ir.quantize(ir, d, scheme)
        quantize_s = time.perf_counter() - t0
        fig = {"ir_mb": round(sum(f.stat().st_size for f in d.iterdir()) / 2**20, 1),
               "quantize_s": round(quantize_s, 1), **perplexities(d, tok), **engine_figures(scheme, tmp)}
        out[scheme] = {k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items()}
        print(scheme, json.dumps(out[scheme]), flush=True)
    base = out["none"]
    for scheme in openvino_ir.QUANTIZATIONS[1:]:
        for k in ("general_ppl", "retention_ppl"):
            out[scheme][f"{k}_delta"] = round(out[scheme][k] / base[k] - 1, 4)
        out[scheme]["knowledge_delta"] = round(out[scheme]["knowledge_general"] - base["knowledge_general"], 3)
        out[scheme]["speedup"] = round(out[scheme]["tokens_per_s"] / base["tokens_per_s"], 2)
    shutil.rmtree(tmp, ignore_errors=True)
    assert all(math.isfinite(out[s]["general_ppl"]) for s in openvino_ir.QUANTIZATIONS)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
