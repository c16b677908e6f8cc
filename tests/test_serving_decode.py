"""The serving decode path (decode attention + headroom cache) gives the stock path's logits:
left-padded rows of different lengths, many steps (past a reallocation), and rows dropped midway
as the engine's batch does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from selflearn.serving import decode


@pytest.fixture(scope="module")
def models(embedded_model_dir):
    stock = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    fast = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32,
                                                attn_implementation=decode.register())
    return stock.eval(), fast.eval()


def _prefill(model, cache, prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, cache=cache,
                logits_to_keep=1)
    return out.logits[:, -1], mask, mask.sum(1)


def _drop_row(cache, mask, pos, last, keep):
    sel = torch.tensor(keep)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[sel], layer.values[sel]
    return mask[sel], pos[sel], last[sel]


def test_decode_path_matches_the_stock_path(models):
    stock, fast = models
    prompts = [[1, 504, 3458, 314, 253, 1345, 30], [1, 2683, 282], [1, 9, 77, 3301, 12, 4040, 5, 260, 1100, 42]]
    with torch.inference_mode():
        state = {}
        for name, model, cache in (("stock", stock, DynamicCache()), ("fast", fast, decode.HeadroomCache())):
            logits, mask, pos = _prefill(model, cache, prompts)
            state[name] = [model, cache, mask, pos, logits.argmax(-1)]
            assert isinstance(cache.layers[0], decode.HeadroomLayer) == (name == "fast")
        torch.testing.assert_close(state["fast"][0](input_ids=torch.tensor([[1]])).logits,
                                   state["stock"][0](input_ids=torch.tensor([[1]])).logits)
        for step in range(decode.HEADROOM + 12):  # past one reallocation of the buffers
            if step == 20:  # the engine drops a finished row: new tensors assigned to the layers
                for s in state.values():
                    s[2], s[3], s[4] = _drop_row(s[1], s[2], s[3], s[4], [0, 2])
            outs = {}
            for name, s in state.items():
                model, cache, mask, pos, last = s
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = model(input_ids=last[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                            cache=cache)
                s[2], s[3] = mask, pos + 1
                outs[name] = out.logits[:, -1]
            torch.testing.assert_close(outs["fast"], outs["stock"], atol=2e-4, rtol=1e-4)
            nxt = outs["stock"].argmax(-1)  # both follow the same tokens
            for s in state.values():
                s[4] = nxt
        assert state["fast"][1].layers[0].keys.shape == state["stock"][1].layers[0].keys.shape


def test_prefill_and_odd_head_layouts_go_to_sdpa(models):
    _, fast = models
    q, k = torch.randn(2, 9, 5, 64), torch.randn(2, 3, 5, 64)
    out, _ = decode.decode_attention(fast.model.layers[0].self_attn, q, k, k, None, scaling=0.125, is_causal=True)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ref, _ = sdpa_attention_forward(fast.model.layers[0].self_attn, q, k, k, None, scaling=0.125, is_causal=True)
    torch.testing.assert_close(out, ref)
