"""Tokenise articles and pack them into full blocks: no padding, every token trains.

Documents are concatenated with EOS between them and cut into `block_size` pieces, so not a
single token is padding and none is thrown away. The tail that does not fill a block is either
completed with the stream's first tokens (`fill_tail`, for training: every block has the same
shape, a few dozen tokens are seen twice) or kept as one shorter block (for evaluation, where
every token must count exactly once).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def tokenize(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    texts = list(texts)
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack(docs: Sequence[Sequence[int]], block_size: int, eos_id: int, min_tail: int = 8,
         fill_tail: bool = False) -> list[torch.Tensor]:
    """-> blocks, each a 1-D LongTensor of length `block_size` (the last may be shorter)."""
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        stream.append(eos_id)
    blocks = [torch.tensor(stream[i:i + block_size], dtype=torch.long) for i in range(0, len(stream), block_size)]
    short = bool(blocks) and len(blocks[-1]) < block_size
    if short and fill_tail and len(stream) > block_size:
        missing = block_size - len(blocks[-1])
        blocks[-1] = torch.cat([blocks[-1], torch.tensor(stream[:missing], dtype=torch.long)])
    elif short and len(blocks[-1]) < min_tail:  # a handful of tokens is not worth a step
        blocks.pop()
    return blocks


def batches(blocks: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Group equal-length blocks into [B, T] tensors of near-equal B; a short tail block rides alone.

    Balanced (13 blocks at batch 4 -> 4, 3, 3, 3 rather than 4, 4, 4, 1): a one-row micro-batch
    makes thin matmuls that run far below the machine's peak.
    """
    if not blocks:
        return []
    full = [b for b in blocks if len(b) == len(blocks[0])]
    tail = [b for b in blocks if len(b) != len(blocks[0])]
    n = -(-len(full) // batch_size)
    sizes = [len(full) // n + (1 if i < len(full) % n else 0) for i in range(n)] if n else []
    out, i = [], 0
    for k in sizes:
        out.append(torch.stack(full[i:i + k]))
        i += k
    out += [b.unsqueeze(0) for b in tail]
    return out


def count_tokens(batch_list: Sequence[torch.Tensor]) -> int:
    return sum(b.numel() for b in batch_list)
