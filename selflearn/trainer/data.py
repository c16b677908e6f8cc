"""Tokenise articles and pack them into full blocks: no padding, every token trains.

Documents are concatenated with EOS between them and cut into `block_size` pieces, so not a
single token is padding and none is thrown away. The tail that does not fill a block is either
completed with the stream's first tokens (`fill_tail`, for training: every block has the same
shape, a few dozen tokens are seen twice) or kept as one shorter block (for evaluation, where
every token must count exactly once).
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch

from ..prompting import IGNORE

# A training block is token ids (every token predicts the next), or ids with their labels
# (IGNORE where a token carries no loss: the prompt of a chat example, padding).
Block = Union[torch.Tensor, "tuple[torch.Tensor, torch.Tensor]"]


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


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], text_docs: Sequence[Sequence[int]],
                  block_size: int, eos_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Chat examples (ids, labels) and raw documents into full (ids, labels) blocks.

    An example is never cut: its answer must see its own question. Each block takes whole
    examples in order while they fit, then the rest of the block is filled with the documents'
    token stream (which may be cut anywhere, as in `pack`), and only when that stream is used up
    is the remainder padding without loss. Examples come before the text in a block, so under
    causal attention an answer never sees its article's text beside it: it must come from the
    weights, which is what the round is for. An example longer than a block is dropped.
    """
    queue = [(list(i), list(l)) for i, l in examples if len(i) <= block_size]
    stream: list[int] = []
    for doc in text_docs:
        stream.extend(doc)
        stream.append(eos_id)
    pos = 0
    out = []

    def fits(example: tuple[list[int], list[int]], used: int) -> bool:
        return used + len(example[0]) <= block_size

    while queue or pos < len(stream):
        ids: list[int] = []
        labels: list[int] = []
        while queue and fits(queue[0], len(ids)):
            i, l = queue.pop(0)
            ids, labels = ids + i, labels + l
        take = stream[pos:pos + block_size - len(ids)]
        pos += len(take)
        # The text ran out before the block was full: smaller examples further on go in before it.
        k = next((j for j, ex in enumerate(queue) if fits(ex, len(ids) + len(take))), None)
        while k is not None:
            i, l = queue.pop(k)
            ids, labels = ids + i, labels + l
            k = next((j for j, ex in enumerate(queue) if fits(ex, len(ids) + len(take))), None)
        ids, labels = ids + take, labels + take
        if not ids:  # nothing fits any more (cannot happen: every queued example fits a block)
            break
        pad = block_size - len(ids)
        out.append((torch.tensor(ids + [eos_id] * pad, dtype=torch.long),
                    torch.tensor(labels + [IGNORE] * pad, dtype=torch.long)))
    return out


def ids_and_labels(block: Block) -> tuple[torch.Tensor, torch.Tensor | None]:
    return block if isinstance(block, tuple) else (block, None)


def loss_tokens(batch: Block) -> int:
    """Positions of a [B, T] batch that predict a labelled next token."""
    ids, labels = ids_and_labels(batch)
    if labels is None:
        return ids.shape[0] * (ids.shape[1] - 1)
    return int((labels[..., 1:] != IGNORE).sum())


def batches(blocks: Sequence[Block], batch_size: int) -> list[Block]:
    """Group equal-length blocks into [B, T] tensors of near-equal B; a short tail block rides alone.

    Balanced (13 blocks at batch 4 -> 4, 3, 3, 3 rather than 4, 4, 4, 1): a one-row micro-batch
    makes thin matmuls that run far below the machine's peak.
    """
    if not blocks:
        return []
    width = len(ids_and_labels(blocks[0])[0])
    full = [b for b in blocks if len(ids_and_labels(b)[0]) == width]
    tail = [b for b in blocks if len(ids_and_labels(b)[0]) != width]

    def stack(group: Sequence[Block]) -> Block:
        pairs = [g for g in group if isinstance(g, tuple)]
        if pairs:
            return torch.stack([ids for ids, _ in pairs]), torch.stack([labels for _, labels in pairs])
        return torch.stack([g for g in group if isinstance(g, torch.Tensor)])

    n = -(-len(full) // batch_size)
    sizes = [len(full) // n + (1 if i < len(full) % n else 0) for i in range(n)] if n else []
    out, i = [], 0
    for k in sizes:
        out.append(stack(full[i:i + k]))
        i += k
    out += [stack([b]) for b in tail]
    return out


def count_tokens(batch_list: Sequence[Block]) -> int:
    return sum(ids_and_labels(b)[0].numel() for b in batch_list)
