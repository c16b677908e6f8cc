"""Learning what users said: corrections and ratings as training signal.

A correction (the answer should have been X) is taught twice: as supervised chat examples, the
question under a few phrasings -> X, packed with the round's other examples; and as a preference
pair, X chosen over the answer the model gave, for DPO (Rafailov et al. 2023). A thumbs up or down
without a correction is an unpaired judgement of the answer given, which is what KTO (Ethayarajh et
al. 2024) learns from. Both preference losses use the parent weights as the reference: their
log-probabilities are computed once, before training, so no second model is held in memory.

The two losses follow TRL's formulation (DPO's sigmoid loss; KTO with the batch KL estimate from
mismatched prompt/answer pairs, clamped at 0 and not differentiated). TRL itself is not used: in
TRL 1.16 they are methods of `DPOTrainer`/`KTOTrainer`, which run their own HF Trainer loop and
bring datasets, pyarrow, pandas and accelerate, where a round already has its training loop (CPU
bf16 with fp32 master weights); the losses are a few lines each, tested against their formulas.

The gate's check: each correction's question in one more phrasing, never trained, on which the
candidate must prefer the correction over the old answer more often than the parent does.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..contracts import ProgressEvent, StepDone
from ..feedback import FeedbackRecord, normalize
from ..prompting import IGNORE, render_example
from . import loop
from .loss import supports_fused_loss, unwrap_peft

log = logging.getLogger("selflearn.trainer.preference")

# The phrasings a correction's question is trained under (the first is the question as asked)...
TRAIN_FORMS = ("{q}", "Quick question: {q}", "{q} Please answer briefly.", "I'd like to know: {q}",
               "Can you tell me? {q}", "Question: {q}", "{q} Thanks!", "Tell me, {q}")
# ... and the one it is checked under, never trained.
HELD_OUT_FORM = "Do you happen to know this? {q}"


@dataclass
class Judged:
    """A prompt and an answer, judged good (desirable) or bad."""

    prompt: str
    answer: str
    desirable: bool


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str


@dataclass
class FeedbackData:
    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)  # supervised
    texts: list[str] = field(default_factory=list)  # the corrections, also as plain text
    pairs: list[Pair] = field(default_factory=list)  # DPO
    judged: list[Judged] = field(default_factory=list)  # KTO
    held_out: list[Pair] = field(default_factory=list)  # the gate's


def build(tokenizer: Any, corrections: Sequence[FeedbackRecord], ratings: Sequence[FeedbackRecord], *,
          repeats: int) -> FeedbackData:
    """The training data of a round's selected feedback (selflearn.feedback.select)."""
    out = FeedbackData()
    for rec in corrections:
        if not rec.prompt or not rec.correction:  # selected corrections have both
            continue
        q, fix = rec.prompt.strip(), rec.correction
        for form in TRAIN_FORMS[:repeats]:
            out.examples.append(render_example(tokenizer, [{"role": "user", "content": form.format(q=q)}], fix))
        out.texts.append(fix)
        if rec.reply and rec.reply.strip() and normalize(rec.reply) != normalize(fix):
            out.pairs.append(Pair(q, fix, rec.reply.strip()))
            out.held_out.append(Pair(HELD_OUT_FORM.format(q=q), fix, rec.reply.strip()))
    for rec in ratings:
        if rec.prompt and rec.reply and rec.reply.strip():
            out.judged.append(Judged(rec.prompt.strip(), rec.reply.strip(), rec.rating == "up"))
    return out


# -- log-probabilities ------------------------------------------------------------------------------
def _batch(tokenizer: Any, items: Sequence[tuple[str, str]], device: torch.device):
    rows = [render_example(tokenizer, [{"role": "user", "content": p}], a) for p, a in items]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows], device=device)
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows], device=device)
    return ids, labels, mask


def answer_logps(model: torch.nn.Module, tokenizer: Any, items: Sequence[tuple[str, str]],
                 precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum of the answer tokens' log-probabilities, their count) per (prompt, answer), with the
    graph when grad is enabled. Where the head is a plain linear layer, logits are computed for the
    answer tokens only (an answer is a fifth of its rendered exchange, system prompt included)."""
    device = next(model.parameters()).device
    ids, labels, mask = _batch(tokenizer, items, device)
    target = labels[:, 1:]
    keep = target != IGNORE
    with loop._autocast(device, precision):
        if supports_fused_loss(model):
            inner = unwrap_peft(model)
            hidden = inner.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            logits = (hidden[:, :-1][keep] @ inner.get_output_embeddings().weight.T).float()
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()
    logp = torch.log_softmax(logits, -1).gather(-1, target[keep][:, None]).squeeze(-1)
    rows = torch.arange(ids.shape[0], device=device)[:, None].expand_as(target)[keep]
    sums = torch.zeros(ids.shape[0], device=device, dtype=logp.dtype).index_add(0, rows, logp)
    return sums, keep.sum(-1)


@torch.inference_mode()
def reference_logps(model: torch.nn.Module, tokenizer: Any, items: Sequence[tuple[str, str]], *,
                    precision: str = "fp32", batch_size: int = 8) -> tuple[list[float], list[int]]:
    sums: list[float] = []
    counts: list[int] = []
    for i in range(0, len(items), batch_size):
        s, n = answer_logps(model, tokenizer, items[i:i + batch_size], precision)
        sums += s.tolist()
        counts += n.tolist()
    return sums, counts


def preference_rate(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[Pair], *,
                    precision: str = "fp32") -> float | None:
    """Share of pairs whose chosen answer the model finds likelier than the rejected one, per token
    (answers differ in length)."""
    if not pairs:
        return None
    s, n = reference_logps(model, tokenizer, [(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)],
                           precision=precision)
    per_token = [x / max(1, c) for x, c in zip(s, n)]
    return round(sum(per_token[2 * i] > per_token[2 * i + 1] for i in range(len(pairs))) / len(pairs), 4)


# -- losses -----------------------------------------------------------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's sigmoid loss: -log σ(β((π_c - ref_c) - (π_r - ref_r))), averaged over pairs."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))).mean()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO: a desirable answer's loss is 1 - σ(β(r - z)), an undesirable one's 1 - σ(β(z - r)),
    with r = π - ref and z the (detached, non-negative) KL estimate."""
    r = policy - ref
    z = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    return torch.where(desirable, good, bad).mean()


# -- the preference phase ------------------------------------------------------------------------------
@dataclass
class References:
    """The parent's log-probabilities of everything the preference phase compares against."""

    chosen: list[float]
    rejected: list[float]
    judged: list[float]
    mismatched: list[float]  # judged prompts with the next item's answer: KTO's KL estimate
    held_out_rate: float | None  # the parent's preference rate on the held-out phrasings


def mismatched(judged: Sequence[Judged]) -> list[tuple[str, str]]:
    return [(j.prompt, judged[(i + 1) % len(judged)].answer) for i, j in enumerate(judged)]


def references(model: torch.nn.Module, tokenizer: Any, fb: FeedbackData, precision: str, *,
               train: bool = True) -> References:
    """The parent's side of everything; only the gate's held-out rate when `train` is False (no
    preference phase)."""
    def logps(items):
        return reference_logps(model, tokenizer, items, precision=precision)[0] if train else []

    return References(logps([(p.prompt, p.chosen) for p in fb.pairs]), logps([(p.prompt, p.rejected) for p in fb.pairs]),
                      logps([(j.prompt, j.answer) for j in fb.judged]), logps(mismatched(fb.judged)),
                      preference_rate(model, tokenizer, fb.held_out, precision=precision))


@dataclass
class PreferenceConfig:
    beta: float = 0.1
    learning_rate: float = 5e-5
    epochs: float = 2
    # The chosen answers' per-token NLL beside the DPO loss (RPO, Pang et al. 2024; TRL's
    # `rpo_alpha`): DPO alone can lower both answers' likelihood, which teaches no fact.
    sft_weight: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    pairs_per_step: int = 8
    judged_per_step: int = 8
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class PreferenceStats:
    """What the preference phase did."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    pairs: int = 0
    judged: int = 0


def train(model: torch.nn.Module, tokenizer: Any, fb: FeedbackData, refs: References, cfg: PreferenceConfig, *,
          master: "loop.MasterWeights | None" = None,
          on_step: Callable[[ProgressEvent], None] | None = None) -> PreferenceStats:
    """DPO on the pairs and KTO on the judged answers, in the same steps, each told to `on_step`
    as a `StepDone` of kind `preference`."""
    n_pairs, n_judged = len(fb.pairs), len(fb.judged)
    if not n_pairs and not n_judged:
        return PreferenceStats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if master is None and trainable[0].dtype != torch.float32:
        master = loop.MasterWeights(trainable)
    params = master.master if master else trainable
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    steps = max(1, math.ceil(cfg.epochs * max(n_pairs / cfg.pairs_per_step, n_judged / cfg.judged_per_step)))
    rng = random.Random(cfg.seed)
    pair_order: list[int] = []
    judged_order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = torch.zeros((), device=next(model.parameters()).device)
        if n_pairs:
            while len(pair_order) < cfg.pairs_per_step:
                pair_order += rng.sample(range(n_pairs), n_pairs)
            idx, pair_order = pair_order[:cfg.pairs_per_step], pair_order[cfg.pairs_per_step:]
            s, n = answer_logps(model, tokenizer, [(fb.pairs[i].prompt, a) for i in idx
                                                  for a in (fb.pairs[i].chosen, fb.pairs[i].rejected)], cfg.precision)
            ref_c = torch.tensor([refs.chosen[i] for i in idx], device=s.device)
            ref_r = torch.tensor([refs.rejected[i] for i in idx], device=s.device)
            loss = loss + dpo_loss(s[0::2], s[1::2], ref_c, ref_r, cfg.beta)
            if cfg.sft_weight:
                loss = loss - cfg.sft_weight * s[0::2].sum() / n[0::2].sum().clamp(min=1)
        if n_judged:
            while len(judged_order) < cfg.judged_per_step:
                judged_order += rng.sample(range(n_judged), n_judged)
            idx, judged_order = judged_order[:cfg.judged_per_step], judged_order[cfg.judged_per_step:]
            s, _ = answer_logps(model, tokenizer, [(fb.judged[i].prompt, fb.judged[i].answer) for i in idx],
                                cfg.precision)
            with torch.no_grad():
                mm = mismatched(fb.judged)
                sm, _ = answer_logps(model, tokenizer, [mm[i] for i in idx], cfg.precision)
                kl = (sm - torch.tensor([refs.mismatched[i] for i in idx], device=sm.device)).mean()
            desirable = torch.tensor([fb.judged[i].desirable for i in idx], device=s.device)
            ref = torch.tensor([refs.judged[i] for i in idx], device=s.device)
            loss = loss + kto_loss(s, ref, desirable, kl, cfg.beta)
        loss.backward()
        if master:
            master.grads_to_master()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if master:
            master.master_to_model()
        losses.append(round(loss.item(), 4))
        if on_step:
            took = time.perf_counter() - t0
            on_step(StepDone(step + 1, steps, losses[-1], kind="preference", lr=cfg.learning_rate,
                             eta_s=round(took / (step + 1) * (steps - step - 1), 1)))
    model.eval()
    return PreferenceStats(steps, losses, round(time.perf_counter() - t0, 2), n_pairs, n_judged)
