"""Causal attention that does not compute the masked half, for training on a CPU.

Dense causal attention computes every query-key score and then masks the upper triangle away:
half of its matmul work and of its softmax traffic is thrown out. Here the queries go in chunks
and each chunk only meets the keys at or before its end, so a 512-token block at chunks of 128
does 10/16 of the dense work. Grouped-query heads are folded into the query rows instead of
copying each key/value head once per query head.

Registered with transformers as `selflearn_causal` (with sdpa's mask builder, which hands over
no mask at all for plain causal training blocks), and switched on only for the compiled training
loop on a CPU, where inductor fuses each chunk's mask, softmax and casts; on a GPU the fused
flash kernels behind sdpa already skip the masked blocks.
"""

from __future__ import annotations

import torch

NAME = "selflearn_causal"
CHUNK = 128  # queries per chunk: smaller skips more, but thin matmuls run below the peak


def chunked_causal_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, T, D], key/value [B, Hkv, S, D]
    -> ([B, T, H, D], no weights). `attention_mask` is None (plain causal) or sdpa's boolean
    [B, 1, T, S] mask (True = attend), which is always causal itself in a decoder."""
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    if key.shape[2] != T or H % Hkv or (dropout and module.training):
        # Decoding with a cache, odd head layouts or attention dropout: the general kernel.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    g = H // Hkv
    # Rows ordered (position, group) inside each key/value head: a chunk of positions is then a
    # contiguous slice of rows, and every row of a slice meets the same keys.
    q = query.transpose(1, 2).reshape(B, T, Hkv, g, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * g, D)
    outs = []
    for s in range(0, T, CHUNK):
        e = min(T, s + CHUNK)
        scores = torch.matmul(q[:, :, s * g:e * g], key[:, :, :e].transpose(-1, -2)).view(B, Hkv, e - s, g, e)
        # [chunk, 1, keys] position grids: the same for every group row.
        kpos = torch.arange(e, device=q.device)[None, None, :]
        qpos = torch.arange(s, e, device=q.device)[:, None, None]
        allowed = kpos <= qpos
        if attention_mask is not None:
            m = attention_mask[:, :, s:e, :e]
            m = m if m.dtype == torch.bool else m == 0  # additive float masks: 0 means attend
            # Keeping the diagonal spares a padded query row from a softmax over nothing (NaN);
            # such rows' outputs are never used.
            allowed = (allowed & m[:, :, :, None, :]) | (kpos == qpos)
        scores = torch.where(allowed, scores.float() * scaling, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(value.dtype).view(B, Hkv, (e - s) * g, e)
        outs.append(torch.matmul(probs, value[:, :, :e]))
    out = torch.cat(outs, dim=2).view(B, Hkv, T, g, D).permute(0, 2, 1, 3, 4).reshape(B, T, H, D)
    return out, None


def register() -> str:
    """Make `NAME` a valid attn_implementation (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, chunked_causal_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
