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
from selflearn.trainer import attention, compiled, data, loop
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
        # Per tensor, relative to its size: elementwise, the entries near zero differ by summation
        # order alone (fp32 reductions in another order across CPUs and thread counts).
        err = (g - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)
        assert err < 1e-4, (name, err.item())


@pytest.mark.parametrize("chunk,group", [(7, 16), (64, 4096)])
def test_fused_loss_in_chunks_and_groups_is_plain_cross_entropy(chunk, group):
    # Several groups exercise the fp32 sum of the weight gradient; a ragged last chunk the tail.
    torch.manual_seed(0)
    h = torch.randn(50, 12, requires_grad=True)
    w = torch.randn(30, 12, requires_grad=True)
    y = torch.randint(0, 30, (50,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y)
    gh, gw = torch.autograd.grad(3 * ref, (h, w))
    got = fused_linear_cross_entropy(h, w, y, chunk=chunk, group=group)
    got_gh, got_gw = torch.autograd.grad(3 * got, (h, w))  # a grad_out other than 1 rescales
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(got_gh, gh, atol=1e-6) and torch.allclose(got_gw, gw, atol=1e-6)


class _Attn(torch.nn.Module):
    pass


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_causal_attention_is_causal_attention(padded):
    """Same outputs and gradients as sdpa, across chunk edges, with grouped kv heads and a mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 6, 2, attention.CHUNK * 2 + 44, 16
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_(True)  # as the models hand it over
    k = torch.randn(B, Hkv, T, D, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, requires_grad=True)
    mask = None
    keep = torch.ones(B, T, dtype=torch.bool)
    if padded:  # the second row is left-padded by 37 tokens
        keep[1, :37] = False
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    module = _Attn()
    module.num_key_value_groups = H // Hkv
    module.is_causal = True
    got, _ = attention.chunked_causal_attention(module, q, k, v, mask, scaling=D ** -0.5)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    assert got.shape == ref.shape == (B, T, H, D)
    rows = keep[:, :, None, None].expand_as(got)  # padded queries' outputs are never used
    assert torch.allclose(got[rows], ref[rows], atol=1e-5)
    assert torch.isfinite(got).all()
    probe = torch.randn_like(got) * rows
    grads = torch.autograd.grad((got * probe).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)


def test_chunked_attention_gives_the_models_own_loss(embedded_model_dir):
    torch.manual_seed(0)
    model = basemodel.load_model(embedded_model_dir)  # fp32
    x = torch.randint(0, model.config.vocab_size, (1, attention.CHUNK + 40))
    with torch.no_grad():
        ref = causal_lm_loss(model, x).item()
        model.set_attn_implementation(attention.register())
        got = causal_lm_loss(model, x).item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_fused_loss_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="no tokens"):
        fused_linear_cross_entropy(torch.zeros(0, 4), torch.zeros(8, 4), torch.zeros(0, dtype=torch.long))


def test_unsupported_families_take_the_models_own_loss(tiny_opt_dir):
    model = basemodel.load_model(tiny_opt_dir)
    model.config.model_type = "gemma2"  # soft-capped logits: the fused path would be wrong
    assert not supports_fused_loss(model)
    x = torch.randint(0, 100, (1, 16))
    assert causal_lm_loss(model, x).item() == pytest.approx(model(input_ids=x, labels=x).loss.item())


def test_compiled_training_learns_what_eager_training_learns(tiny_opt_dir):
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler for torch.compile on this machine")
    # Blocks longer than an attention chunk, and two batch sizes (4, 3, 3) through one graph.
    blocks = data.pack([list(range(3, 300))] * 5, attention.CHUNK + 32, eos_id=2, fill_tail=True)
    batches = data.batches(blocks, 4)
    assert sorted({b.shape[0] for b in batches}) == [3, 4]
    runs = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = basemodel.load_model(tiny_opt_dir)
        torch._dynamo.reset()
        stats = loop.train(model, batches, loop.LoopConfig(gradient_accumulation=1, learning_rate=1e-3,
                                                            compile=mode))
        runs[mode] = (stats.losses, model)
        if mode == "on":
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the blocks were compiled"
            assert all(b._compiled_call_impl is None for b in compiled.repeated_blocks(model)), "compile is undone"
    assert len(runs["on"][0]) == len(runs["off"][0]) >= 2
    assert runs["on"][0] == pytest.approx(runs["off"][0], rel=2e-3)
    assert runs["on"][0][-1] < runs["on"][0][0], "it learns"
