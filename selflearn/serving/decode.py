"""The decode step's two hot spots on a CPU, replaced: attention for one new token, and the KV cache.

Profiled on the embedded model (batch 16, ~100 cached positions, bf16, 2 cores), a decode step
spent about a third of its time in sdpa's CPU flash kernel, which is built for long query blocks
and costs ~1.5 ms per layer for a single query row, and a tenth in `torch.cat`, because
transformers' DynamicCache copies every layer's whole cache to append one position.

- `decode_attention`: one query row per sequence as two small batched matmuls, grouped-query
  heads folded into the rows (no key/value copy per query head); longer queries (prefill) still
  go to sdpa. Registered with transformers as `selflearn_decode`, with sdpa's mask builder.
- `HeadroomCache`: each layer's keys and values live in a buffer with room for `HEADROOM` more
  positions, so appending is a slice write, and the whole cache is copied once per HEADROOM steps.
  The engine's batch merges and row drops assign new tensors to `layer.keys` / `layer.values`;
  the next append then starts a fresh buffer around them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

NAME = "selflearn_decode"
HEADROOM = 64  # positions of room per (re)allocation


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, T, D], key/value [B, Hkv, S, D]
    -> ([B, T, H, D], no weights). `attention_mask`: None or sdpa's boolean [B, 1, T, S] (True = attend)."""
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    if T != 1 or H % Hkv or (dropout and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    g = H // Hkv
    q = query.reshape(B, Hkv, g, D)  # T == 1: head h = kv_head * g + group, as repeat_kv orders them
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # [B, Hkv, g, S]
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        scores = scores.masked_fill(~allowed[:, :, -1:, :], float("-inf"))  # [B or 1, 1, 1, S]: broadcasts
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, g, D]
    return out.reshape(B, 1, H, D), None


def register() -> str:
    """Make `NAME` a valid attn_implementation (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


class HeadroomLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers with spare positions."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._bufs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        n = keys.shape[-2] if keys is not None and keys.numel() else 0
        add = key_states.shape[-2]
        bufs = self._bufs
        # Someone assigned new tensors (a batch merge or a row drop), or the room ran out: re-home.
        if (bufs is None or self._views is None or keys is not self._views[0] or values is not self._views[1]
                or n + add > bufs[0].shape[-2]):
            cap = n + add + HEADROOM
            kb = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
            vb = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
            if n and keys is not None and values is not None:
                kb[..., :n, :] = keys
                vb[..., :n, :] = values
            bufs = self._bufs = (kb, vb)
        bufs[0][..., n:n + add, :] = key_states
        bufs[1][..., n:n + add, :] = value_states
        self.keys, self.values = bufs[0][..., :n + add, :], bufs[1][..., :n + add, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values


class HeadroomCache(DynamicCache):
    """A DynamicCache of HeadroomLayers (same interface: `.layers[i].keys` / `.values`)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=HeadroomLayer)
