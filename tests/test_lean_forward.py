"""The spike's lean forward (bench/lean_forward.py) computes what transformers' Llama computes: its
figures in docs/serving.md are of a correct engine, not of a fast wrong one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from lean_forward import LeanLlama  # noqa: E402

from selflearn import basemodel  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    model = basemodel.load_model(basemodel.EMBEDDED_MODEL).eval()
    tok = basemodel.load_tokenizer(basemodel.resolve(basemodel.EMBEDDED_MODEL))
    return model, tok


def test_prefill_and_decode_match_transformers(llama):
    """Three rows of different lengths in their own slots decode together; each row's logits are
    those of the stock forward over its whole sequence (fp32), and so are its greedy tokens."""
    model, tok = llama
    lean = LeanLlama(model, slots=4, max_positions=128)
    prompts = ["The capital of France is", "Once upon a time there was a little", "def fibonacci(n):"]
    seqs = [tok(p)["input_ids"] for p in prompts]
    with torch.inference_mode():
        last = []
        for slot, ids in enumerate(seqs):
            got = lean.prefill(slot, torch.tensor(ids))
            want = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
            last.append(int(got.argmax()))
        for _ in range(4):
            logits = lean.decode(torch.tensor(last), torch.tensor([len(s) for s in seqs]))
            for r in range(3):
                seqs[r] = seqs[r] + [last[r]]
                want = model(input_ids=torch.tensor([seqs[r]])).logits[0, -1]
                assert torch.allclose(logits[r], want, atol=1e-3), (r, (logits[r] - want).abs().max())
            last = [int(x) for x in logits.argmax(-1)]
    assert "Paris" in tok.decode(seqs[0])


def test_a_slot_moved_down_continues_as_before(llama):
    """Finished rows free their slot and the last live row moves into it: its next logits do not change."""
    model, tok = llama
    lean = LeanLlama(model, slots=2, max_positions=64)
    ids = tok("Why is the sky blue?")["input_ids"]
    with torch.inference_mode():
        first = int(lean.prefill(1, torch.tensor(ids)).argmax())
        lean.move(1, 0, len(ids))
        moved = lean.decode(torch.tensor([first]), torch.tensor([len(ids)]))[0]
        want = model(input_ids=torch.tensor([ids + [first]])).logits[0, -1]
    assert torch.allclose(moved, want, atol=1e-3)


def test_a_model_it_cannot_compute_is_refused(tiny_opt_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="not of the Llama family"):
        LeanLlama(AutoModelForCausalLM.from_pretrained(tiny_opt_dir), slots=1, max_positions=16)
