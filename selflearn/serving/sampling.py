"""Next-token selection for a batch whose rows each carry their own parameters.

All tensors are (B, V) logits or (B,) per-row parameters; rows with temperature 0 are greedy.
The rules follow transformers' processors (repetition penalty as in CTRL, then temperature, top-k,
top-p) so a request behaves the same here as through `model.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Push down every token already in the row's prompt or output (seen: (B, V) bool)."""
    if not bool((penalty != 1).any()):
        return logits
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row: argmax where temperature is 0, else top-k/top-p sampling. Returns (B,) long."""
    out = logits.argmax(-1)
    rows = (temperature > 0).nonzero().flatten()
    if rows.numel() == 0:
        return out
    scaled = logits[rows] / temperature[rows, None]
    vocab = scaled.shape[-1]
    k = top_k[rows]
    k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
    kmax = int(k.max())
    # topk returns candidates sorted high to low: a partial sort when every row sets top_k.
    vals, idx = scaled.topk(kmax, dim=-1)
    ranks = torch.arange(kmax, device=vals.device)
    vals = vals.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = vals.softmax(-1)
    # Nucleus: drop a candidate once the mass before it already reaches top_p (the first always stays).
    before = probs.cumsum(-1) - probs
    vals = vals.masked_fill(before >= top_p[rows, None], float("-inf"))
    probs = vals.softmax(-1)
    gens = [generators[int(r)] for r in rows]
    if any(g is not None for g in gens):
        choice = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
    else:
        choice = torch.multinomial(probs, 1).flatten()
    out[rows] = idx.gather(-1, choice[:, None]).flatten()
    return out
