"""Next-token selection for a batch whose rows each carry their own parameters.

All tensors are (B, V) logits or (B,) per-row parameters; rows with temperature 0 are greedy.
The rules follow transformers' processors (repetition penalty as in CTRL, then temperature, top-k,
top-p) so a request behaves the same here as through `model.generate`.

Every value the request validation accepts must be safe here, because one row's failure would
fail every row of its batch. In float32 a valid parameter can still become 0 or infinite
(top_p 1e-300 is 0, logits / 1e-40 overflow), so:

* a temperature below `GREEDY_BELOW` (vLLM's epsilon) is greedy, as 0 is;
* the first top-p candidate always survives, however small top_p (transformers keeps at least one);
* a repetition penalty below `PENALTY_FLOOR` is floored, and a logit it would still push past
  float32's range is clamped to it;
* a row whose probabilities still come out not finite, or summing to zero, takes its greedy token,
  alone: the other rows sample as usual.

For ordinary values none of these changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..contracts import RequestParams

if TYPE_CHECKING:
    from .config import GenerationDefaults

# vLLM's _SAMPLING_EPS: below it, logits / temperature overflows for ordinary logits anyway.
GREEDY_BELOW = 1e-5
# A smaller repetition penalty would divide a model's logits (|x| < 1e4) past float32's max, tying
# every seen token there; floored, they keep their order (a penalty this small already gives the
# most likely seen token all the probability).
PENALTY_FLOOR = 1e-34
# Tokens a row without top_k looks at first for its nucleus (see `sample`).
CANDIDATES = 256


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def resolve(cls, asked: RequestParams, defaults: GenerationDefaults, new_tokens_cap: int) -> SamplingParams:
        """What a request samples with: what it asked for, else the deployment's defaults; new
        tokens within [1, `new_tokens_cap`]."""

        def pick(value: float | None, default: float) -> float:
            return default if value is None else value

        return cls(max_new_tokens=max(1, min(int(pick(asked.max_new_tokens, defaults.max_length)), new_tokens_cap)),
                   temperature=float(pick(asked.temperature, defaults.temperature)),
                   top_p=float(pick(asked.top_p, defaults.top_p)), top_k=int(pick(asked.top_k, defaults.top_k)),
                   repetition_penalty=float(pick(asked.repetition_penalty, defaults.repetition_penalty)),
                   stop=tuple(defaults.stop if asked.stop is None else asked.stop), seed=asked.seed)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Push down every token already in the row's prompt or output (seen: (B, V) bool).

    A penalty near 0 (or one that float32 rounds to 0) would divide a positive logit to infinity:
    it is floored at `PENALTY_FLOOR`, and finite logits stay finite whatever they are (clamped to
    float32's range); infinite ones keep what they were."""
    if not bool((penalty != 1).any()):
        return logits
    p = penalty.clamp(min=PENALTY_FLOOR)[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    big = torch.finfo(logits.dtype).max
    penalised = torch.where(logits.isfinite(), penalised.nan_to_num(nan=0.0, posinf=big, neginf=-big), logits)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row: argmax where temperature is (nearly) 0, else top-k/top-p sampling.

    Returns (B,) long. Never raises for a row's parameters: a row whose distribution is not a
    distribution (not finite, or zero mass) gets its greedy token instead."""
    out = logits.argmax(-1)
    rows = (temperature >= GREEDY_BELOW).nonzero().flatten()
    if rows.numel() == 0:
        return out
    scaled = logits[rows] / temperature[rows, None]
    vocab = scaled.shape[-1]
    k = top_k[rows]
    k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
    p = top_p[rows]
    gens = [generators[int(r)] for r in rows]
    if vocab > CANDIDATES:
        # Sorting a whole vocabulary per row was most of a sampled decode step (16 rows x 49k
        # tokens: ~130 ms, against a ~40 ms forward). Rows that truncate nothing draw from the
        # softmax as it is; the others look at their best CANDIDATES tokens first.
        whole = (k == vocab) & (p >= 1)
        if bool(whole.any()):
            w = whole.nonzero().flatten()
            probs = scaled[w].softmax(-1)
            ok = probs.isfinite().all(-1) & (probs.sum(-1) > 0)
            good = w[ok]
            if good.numel():
                out[rows[good]] = _draw(probs[ok], [gens[i] for i in good.tolist()])
            rest = ~whole
            rest[w[~ok]] = True  # not a distribution: the truncated path gives it its greedy token
            if not bool(rest.any()):
                return out
            sel = rest.nonzero().flatten()
            rows, scaled, k, p = rows[sel], scaled[sel], k[sel], p[sel]
            gens = [gens[i] for i in sel.tolist()]
        return _truncated(out, rows, scaled, k, p, gens, min(int(k.max()), CANDIDATES))
    return _truncated(out, rows, scaled, k, p, gens, int(k.max()))


def _truncated(out: torch.Tensor, rows: torch.Tensor, scaled: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
               gens: list[torch.Generator | None], width: int) -> torch.Tensor:
    """Top-k, then nucleus, among each row's best `width` tokens. A narrower `width` than a row's
    top-k stands for the whole vocabulary only where that changes nothing: where the row has no
    top-k and its best `width` tokens already hold `top_p` of the mass, so the nucleus ends among
    them. Rows where it does not hold are drawn again over all their candidates."""
    vocab = scaled.shape[-1]
    width = min(width, vocab)
    # topk returns candidates sorted high to low: a partial sort.
    vals, idx = scaled.topk(width, dim=-1)
    ranks = torch.arange(width, device=vals.device)
    vals = vals.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    wide = k > width  # rows whose top-k reaches past the candidates (then k == vocab: no top-k)
    if bool(wide.any()):
        mass = (vals - scaled.logsumexp(-1, keepdim=True)).exp()  # each candidate's share of all tokens
        short = wide & ((k < vocab) | ~(mass.sum(-1) >= p))
        if bool(short.any()):
            return _truncated(out, rows, scaled, k, p, gens, vocab)
        probs = torch.where(wide[:, None], mass, vals.softmax(-1))
    else:
        probs = vals.softmax(-1)
    # Nucleus: drop a candidate once the mass before it already reaches top_p; the first always
    # stays, also when top_p is 0 in float32 (a valid 1e-300 is).
    before = probs.cumsum(-1) - probs
    vals = vals.masked_fill((before >= p[:, None]) & (ranks[None, :] > 0), float("-inf"))
    probs = vals.softmax(-1)
    ok = probs.isfinite().all(-1) & (probs.sum(-1) > 0)
    if not bool(ok.all()):
        # A one-hot row keeps multinomial from raising for the whole batch (and draws as much
        # randomness as any row, so the other rows' draws do not move); the greedy token replaces it.
        probs = torch.where(ok[:, None], probs, (ranks == 0).to(probs.dtype)[None, :])
    choice = _draw(probs, gens)
    out[rows] = torch.where(ok, idx.gather(-1, choice[:, None]).flatten(), out[rows])
    return out


def _draw(probs: torch.Tensor, gens: list[torch.Generator | None]) -> torch.Tensor:
    """One index per row of `probs`, with the row's own generator where it has one."""
    if any(g is not None for g in gens):
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
    return torch.multinomial(probs, 1).flatten()
