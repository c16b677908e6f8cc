"""Causal-LM loss without materialising the full [tokens, vocab] logits.

With a 49k vocabulary the logits of one 4 x 512 micro-batch are 100M numbers: HF's loss upcasts
them to fp32 (400 MB), and autograd keeps them and a same-sized gradient around for backward.
On a CPU that traffic, not the arithmetic, is a large slice of a training step.

`fused_linear_cross_entropy` walks the tokens in small chunks: for each it computes the logits,
the loss and the logits' gradient (softmax minus one-hot) at once, writing only that gradient
out in the logits' dtype; then two big matmuls fold it into the hidden states' and the output
weight's gradients. Backward only hands over (or rescales) what forward already computed. Same
arithmetic as `lm_head` + `cross_entropy`, without the fp32 logits or anything kept for backward.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Model families whose logits are exactly `lm_head(decoder hidden states)`: no soft-capping, no
# scaling, no bias. Others (Gemma's soft-capped logits, say) take the model's own loss.
FUSED_FAMILIES = frozenset({"llama", "opt", "mistral", "qwen2", "qwen3", "phi3"})


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
              grad_out: torch.Tensor) -> torch.Tensor:
    """Sum of one chunk's losses; writes scale * d(sum)/d(logits) into `grad_out`.

    Plain pointwise math and reductions, so that inductor fuses it into two passes over the
    chunk; eagerly it is a handful of passes, still without keeping anything for backward.
    `scale` is a tensor so that a new batch size is not a new compiled graph.
    """
    lf = logits.float()
    valid = (targets >= 0).to(lf.dtype)  # IGNORE (-100) targets: a prompt's tokens carry no loss
    t = targets.clamp(min=0)
    lse = torch.logsumexp(lf, dim=-1)
    loss = ((lse - lf.gather(1, t[:, None]).squeeze(1)) * valid).sum()
    hit = torch.arange(lf.shape[1], device=lf.device)[None, :] == t[:, None]
    grad = torch.exp(lf - lse[:, None]) - hit.to(lf.dtype)  # softmax minus one-hot
    grad_out.copy_(grad * (valid[:, None] * scale))
    return loss


@lru_cache(maxsize=1)
def _compiled_ce_chunk():
    # Row counts vary (the last chunk of a micro-batch, other batch sizes): one dynamic graph.
    return torch.compile(_ce_chunk, dynamic=True)


def _default_chunk(device: torch.device) -> int:
    # On a CPU a chunk of logits that stays in cache beats one big matmul; a GPU wants big ones.
    return 128 if device.type == "cpu" else 2048


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compiled: bool, group: int):
        n, vocab = hidden.shape[0], weight.shape[0]
        ce = _compiled_ce_chunk() if compiled else _ce_chunk
        n_valid = int((targets >= 0).sum())  # the mean is over the tokens that carry a loss
        scale = torch.tensor(1.0 / max(1, n_valid), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Two phases per group of rows: the loss and d(loss)/d(logits) chunk by chunk into one
        # [rows, vocab] buffer (a chunk's logits never leave the cache), then both gradients as
        # two full-size matmuls, which run at the machine's matmul peak.
        dlogits = None
        for g0 in range(0, n, group):
            g1 = min(n, g0 + group)
            for i in range(g0, g1, chunk):
                j = min(g1, i + chunk)
                logits = hidden[i:j] @ weight.t()
                if dlogits is None:  # the logits' dtype: bf16 under CUDA autocast, say
                    dlogits = torch.empty((min(n, group), vocab), dtype=logits.dtype, device=logits.device)
                total += ce(logits, targets[i:j], scale, dlogits[i - g0:j - g0])
            assert dlogits is not None  # the group had a chunk
            d = dlogits[:g1 - g0]
            grad_hidden[g0:g1] = d @ weight
            if weight.requires_grad:
                part = d.t() @ hidden[g0:g1]  # low-precision output, fp32 accumulation inside
                if grad_weight is None:
                    grad_weight = part if n <= group else part.float()
                else:
                    grad_weight += part  # several groups: summed in fp32
        # Held as plain attributes (they are results, not inputs), so backward can hand them over
        # without autograd keeping a reference that would force a copy.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the fused cross-entropy's backward runs once (retain_graph is not supported)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # The usual caller backpropagates the loss itself (grad_out 1): the vocabulary-sized
        # weight gradient is then handed over as it is, not copied by a multiply.
        unit = grad_out.device.type == "cpu" and grad_out.item() == 1.0
        gh = grad_hidden if unit else grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = None
        if grad_weight is not None:
            gw = grad_weight.to(ctx.weight_dtype) if unit else (grad_weight * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int | None = None, compiled: bool = False,
                               group: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` ([N, d], [V, d], [N]).

    Targets of -100 (selflearn.prompting.IGNORE) carry no loss and no gradient, as in
    `torch.nn.functional.cross_entropy`; the mean is over the others.

    Holds one [min(N, group), V] gradient buffer in the logits' dtype; `chunk` rows of logits
    at a time. `compiled` fuses each chunk's softmax and gradient with torch.compile (needs a
    working compiler).
    """
    if hidden.shape[0] == 0:
        raise ValueError("no tokens to compute a loss on")
    if chunk is None:
        chunk = _default_chunk(hidden.device)
    return _FusedLinearCE.apply(hidden.contiguous(), weight, targets, chunk, compiled, group)


def unwrap_peft(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base_model = getattr(model, "get_base_model", None) if hasattr(model, "peft_config") else None
    return cast("PreTrainedModel", get_base_model() if callable(get_base_model) else model)


def supports_fused_loss(model: torch.nn.Module) -> bool:
    """True when `model`'s logits are plainly lm_head(base_model(...)) and the fused path applies."""
    inner = unwrap_peft(model)
    cfg = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return (cfg is not None and getattr(cfg, "model_type", None) in FUSED_FAMILIES
            and type(head) is torch.nn.Linear and head.bias is None
            and getattr(inner, "base_model", inner) is not inner
            and not getattr(cfg, "final_logit_softcapping", None))


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None,
                   fused: bool | None = None, compiled: bool = False) -> torch.Tensor:
    """Mean next-token loss of `model` on [B, T] `input_ids`: every position predicts the next,
    or with `labels` ([B, T], -100 where no loss) only the labelled ones (an answer, not its prompt)."""
    labels = input_ids if labels is None else labels
    if fused is None:
        fused = supports_fused_loss(model)
    if not fused:
        return model(input_ids=input_ids, labels=labels).loss
    inner = unwrap_peft(model)
    hidden = inner.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    d = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, d)
    y = labels[:, 1:].reshape(-1)
    return fused_linear_cross_entropy(h, inner.get_output_embeddings().weight, y, compiled=compiled)
