"""The training step's fast paths give the same training as the plain one.

The fused loss must equal transformers' own loss and gradients, and a compiled run must learn
exactly what an eager run learns (same losses, step by step); otherwise speed would be bought
with a different model.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from selflearn import basemodel
from selflearn.trainer import data, loop
from selflearn.trainer.loss import causal_lm_loss, fused_linear_cross_entropy, supports_fused_loss


def test_fused_loss_matches_transformers_loss_and_gradients(embedded_model_dir):
    torch.manual_seed(0)
    model = basemodel.load_model(embedded_model_dir)  # fp32: the comparison is exact up to summation order
    assert supports_fused_loss(model)
    x = torch.randint(0, model.config.vocab_size, (2, 64))
    ref = model(input_ids=x, labels=x).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, x)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()  # the tied embedding / lm_head weight among them
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-3, atol=1e-6), name


def test_fused_loss_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="no tokens"):
        fused_linear_cross_entropy(torch.zeros(0, 4), torch.zeros(8, 4), torch.zeros(0, dtype=torch.long))


def test_unsupported_families_take_the_models_own_loss(tiny_opt_dir):
    model = basemodel.load_model(tiny_opt_dir)
    model.config.model_type = "gemma2"  # soft-capped logits: the fused path would be wrong
    assert not supports_fused_loss(model)
    x = torch.randint(0, 100, (1, 16))
    assert causal_lm_loss(model, x).item() == pytest.approx(model(input_ids=x, labels=x).loss.item())


@pytest.mark.slow
def test_compiled_training_learns_what_eager_training_learns(tiny_opt_dir):
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler for torch.compile on this machine")
    blocks = data.pack([list(range(3, 300))] * 6, 64, eos_id=2, fill_tail=True)
    batches = data.batches(blocks, 4)
    runs = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = basemodel.load_model(tiny_opt_dir)
        torch._dynamo.reset()
        stats = loop.train(model, batches, loop.LoopConfig(gradient_accumulation=1, learning_rate=1e-3,
                                                            compile=mode), progress=False)
        runs[mode] = (stats.losses, model)
        if mode == "on":
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the blocks were compiled"
            assert all(b._compiled_call_impl is None for b in loop.repeated_blocks(model)), "compile is undone"
    assert len(runs["on"][0]) == len(runs["off"][0]) >= 2
    assert runs["on"][0] == pytest.approx(runs["off"][0], rel=2e-3)
    assert runs["on"][0][-1] < runs["on"][0][0], "it learns"
