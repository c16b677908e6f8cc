"""Causal-LM loss without materialising the full [tokens, vocab] logits.

With a 49k vocabulary the logits of one 4 x 512 micro-batch are 100M numbers: HF's loss upcasts
them to fp32 (400 MB), and autograd keeps them and a same-sized gradient around for backward.
On a CPU that traffic, not the arithmetic, is a large slice of a training step.

`fused_linear_cross_entropy` walks the tokens in chunks: for each chunk it computes the logits,
the loss and the logits' gradient (softmax minus one-hot) at once, then folds that gradient into
the hidden states' and the output weight's gradients and drops it. Backward only rescales what
forward already computed. Same arithmetic as `lm_head` + `cross_entropy`, a fraction of the memory.
"""

from __future__ import annotations

from functools import lru_cache

import torch

# Model families whose logits are exactly `lm_head(decoder hidden states)`: no soft-capping, no
# scaling, no bias. Others (Gemma's soft-capped logits, say) take the model's own loss.
FUSED_FAMILIES = frozenset({"llama", "opt", "mistral", "qwen2", "qwen3", "phi3"})


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of losses, scale * d(sum)/d(logits)) for one chunk, the gradient in the logits' dtype.

    Written as plain pointwise math and reductions so that inductor fuses it into two passes over
    the chunk; eagerly it is a handful of passes, still without keeping anything for backward.
    """
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    loss = (lse - lf.gather(1, targets[:, None]).squeeze(1)).sum()
    hit = torch.arange(lf.shape[1], device=lf.device)[None, :] == targets[:, None]
    grad = torch.exp(lf - lse[:, None]) - hit.to(lf.dtype)  # softmax minus one-hot
    return loss, (grad * scale).to(logits.dtype)


@lru_cache(maxsize=1)
def _compiled_ce_chunk():
    return torch.compile(_ce_chunk, dynamic=False)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compiled: bool):
        n = hidden.shape[0]
        ce = _compiled_ce_chunk() if compiled else _ce_chunk
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        parts = -(-n // chunk)
        step = -(-n // parts)  # equal chunks: one compiled shape per micro-batch shape
        for i in range(0, n, step):
            h = hidden[i:i + step]
            loss, g = ce(h @ weight.t(), targets[i:i + step], 1.0 / n)
            total += loss
            grad_hidden[i:i + step] = g @ weight
            if grad_weight is not None:
                # One low-precision matmul per chunk (fp32 accumulation inside), summed in fp32.
                grad_weight += g.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        ctx.has_weight_grad = grad_weight is not None
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int = 2048, compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` ([N, d], [V, d], [N]).

    `compiled` fuses each chunk's softmax and gradient with torch.compile (needs a working compiler).
    """
    if hidden.shape[0] == 0:
        raise ValueError("no tokens to compute a loss on")
    return _FusedLinearCE.apply(hidden.contiguous(), weight, targets, chunk, compiled)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def supports_fused_loss(model: torch.nn.Module) -> bool:
    """True when `model`'s logits are plainly lm_head(base_model(...)) and the fused path applies."""
    inner = unwrap_peft(model)
    cfg = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return (cfg is not None and getattr(cfg, "model_type", None) in FUSED_FAMILIES
            and type(head) is torch.nn.Linear and head.bias is None
            and getattr(inner, "base_model", inner) is not inner
            and not getattr(cfg, "final_logit_softcapping", None))


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, *, fused: bool | None = None,
                   compiled: bool = False) -> torch.Tensor:
    """Mean next-token loss of `model` on [B, T] `input_ids` (every position predicts the next)."""
    if fused is None:
        fused = supports_fused_loss(model)
    if not fused:
        return model(input_ids=input_ids, labels=input_ids).loss
    inner = unwrap_peft(model)
    hidden = inner.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    d = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, d)
    y = input_ids[:, 1:].reshape(-1)
    return fused_linear_cross_entropy(h, inner.get_output_embeddings().weight, y, compiled=compiled)
