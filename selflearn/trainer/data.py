"""Tokenise articles and pack them into full blocks: no padding, every token trains.

Documents are concatenated with EOS between them and cut into `block_size` pieces. The tail
that does not fill a block becomes one shorter block of its own (its own micro-batch), so not a
single token is padding and none is thrown away.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def tokenize(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    texts = list(texts)
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack(docs: Sequence[Sequence[int]], block_size: int, eos_id: int, min_tail: int = 8) -> list[torch.Tensor]:
    """-> blocks, each a 1-D LongTensor of length `block_size` (the last may be shorter)."""
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        stream.append(eos_id)
    blocks = [torch.tensor(stream[i:i + block_size], dtype=torch.long) for i in range(0, len(stream), block_size)]
    if blocks and len(blocks[-1]) < min_tail:  # a handful of tokens is not worth a step
        blocks.pop()
    return blocks


def batches(blocks: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Group equal-length blocks into [B, T] tensors; the short tail block rides alone."""
    full = [b for b in blocks if len(b) == len(blocks[0])] if blocks else []
    tail = [b for b in blocks if len(b) != len(blocks[0])] if blocks else []
    out = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    out += [b.unsqueeze(0) for b in tail]
    return out


def count_tokens(batch_list: Sequence[torch.Tensor]) -> int:
    return sum(b.numel() for b in batch_list)
