"""A lean forward for the Llama family, built for continuous-batching decode on a CPU: the spike's
engine (b) in bench/engine_spike.py (issue 28), kept with the figures it made.

transformers' forward is general: it builds a 4-D mask every step, projects q, k and v (and gate
and up) as separate matmuls, and grows its cache by reallocation. On the embedded model (30 small
layers) those costs are a large share of a decode step. This forward keeps the HF weights but:

- fuses q/k/v into one matmul and gate/up into one, per layer;
- keeps the KV cache in preallocated slots, `[layers, slots, kv_heads, max_positions, head_dim]`:
  a request owns a slot from its prefill to its end, a decode step writes one position per row in
  place, and rows at different lengths need no padding or realignment;
- masks by position alone (`arange(S) <= pos`), and reads only the first `S` positions, `S` being
  the longest row's length rounded up to `SPAN`;
- looks up rotary cos/sin from a table made once.

The arithmetic follows transformers' Llama (RMSNorm in float32, rotary in the weights' dtype,
softmax in float32), so logits match the stock forward within bf16 rounding
(tests/test_lean_forward.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPAN = 64  # the attended length is rounded up to this, so a step's shapes change every SPAN tokens


@dataclass
class _Layer:
    ln1: torch.Tensor
    wqkv: torch.Tensor  # [(H + 2 Hkv) D, hidden]
    wo: torch.Tensor
    ln2: torch.Tensor
    wgu: torch.Tensor  # [2 I, hidden]: gate rows, then up rows
    wdown: torch.Tensor


def supports(model: torch.nn.Module) -> str | None:
    """None if `model` is one this forward computes exactly; else why not."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral", "qwen2"):
        return f"model type {getattr(cfg, 'model_type', None)!r} is not of the Llama family"
    if getattr(cfg, "attention_bias", False) and cfg.model_type != "qwen2":
        return "attention projections with a bias"
    if getattr(cfg, "mlp_bias", False):
        return "MLP projections with a bias"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and cfg.model_type != "llama":
        return "sliding-window attention"
    return None


class LeanLlama:
    """Decode-oriented forward over a loaded `LlamaForCausalLM` (its weights are shared, not copied
    where the layout allows)."""

    def __init__(self, model: torch.nn.Module, *, slots: int, max_positions: int):
        why = supports(model)
        if why:
            raise ValueError(f"the lean forward cannot run this model: {why}")
        cfg = model.config
        inner = model.model
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        self.vocab = cfg.vocab_size
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers: list[_Layer] = []
        self.qkv_bias: list[torch.Tensor | None] = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight,
                wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous(),
                wo=a.o_proj.weight,
                ln2=layer.post_attention_layernorm.weight,
                wgu=torch.cat([m.gate_proj.weight, m.up_proj.weight]).contiguous(),
                wdown=m.down_proj.weight))
            bias = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
            self.qkv_bias.append(torch.cat(bias) if all(b is not None for b in bias) else None)
        self.inter = self.layers[0].wgu.shape[0] // 2
        self.max_positions = max_positions
        self.slots = slots
        self.cos, self.sin = self._rotary_table(model, max_positions)
        shape = (len(self.layers), slots, self.kv_heads, max_positions, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _rotary_table(self, model: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..n-1 from the model's own rotary module (its scaling included)."""
        rot = model.model.rotary_emb
        pos = torch.arange(n, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = rot(probe, pos)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)  # [n, D]

    # -- pieces ----------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lay = self.layers[i]
        qkv = F.linear(self._rms(h, lay.ln1), lay.wqkv, self.qkv_bias[i])
        nq, nk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        lay = self.layers[i]
        gu = F.linear(self._rms(h, lay.ln2), lay.wgu)
        return F.linear(F.silu(gu[..., :self.inter]) * gu[..., self.inter:], lay.wdown)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(h, self.norm), self.lm_head)

    # -- prefill: one request into one slot ------------------------------------------------------
    def prefill(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        """Run prompt `ids` ([T] long) into `slot` from position 0; the last position's logits [V]."""
        T = ids.shape[0]
        if T > self.max_positions:
            raise ValueError(f"a {T}-token prompt does not fit the cache's {self.max_positions} positions")
        D, H, Hkv = self.head_dim, self.heads, self.kv_heads
        cos, sin = self.cos[:T], self.sin[:T]
        h = self.embed[ids]  # [T, hidden]
        for i, lay in enumerate(self.layers):
            q, k, v = self._qkv(i, h)
            q = self._rope(q.view(T, H, D).transpose(0, 1), cos, sin)  # [H, T, D]
            k = self._rope(k.view(T, Hkv, D).transpose(0, 1), cos, sin)
            v = v.view(T, Hkv, D).transpose(0, 1)
            self.k[i, slot, :, :T] = k
            self.v[i, slot, :, :T] = v
            att = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=self.scaling,
                                                 enable_gqa=H != Hkv)[0]
            h = h + F.linear(att.transpose(0, 1).reshape(T, H * D), lay.wo)
            h = h + self._mlp(i, h)
        return self.logits(h[-1])

    # -- decode: one token for each of the first n slots -----------------------------------------
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens, pos: [n] for slots 0..n-1 (the token to feed and its position); logits [n, V]."""
        span = min(self.max_positions, (int(pos.max()) // SPAN + 1) * SPAN)
        return self._decode(tokens, pos, span)

    def _decode(self, tokens: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        n = tokens.shape[0]
        D, H, Hkv = self.head_dim, self.heads, self.kv_heads
        g = H // Hkv
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [n, 1, D]
        rows = torch.arange(n, device=tokens.device)
        # Where each row may look: its own positions up to the one being written (float32 bias).
        allowed = torch.arange(span, device=tokens.device)[None] <= pos[:, None]  # [n, span]
        bias = torch.zeros(n, 1, 1, span, device=tokens.device).masked_fill(~allowed[:, None, None], float("-inf"))
        h = self.embed[tokens]  # [n, hidden]
        for i, lay in enumerate(self.layers):
            q, k, v = self._qkv(i, h)
            q = self._rope(q.view(n, H, D), cos, sin)
            k = self._rope(k.view(n, Hkv, D), cos, sin)
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v.view(n, Hkv, D)
            keys, values = kc[:n, :, :span], vc[:n, :, :span]  # [n, Hkv, span, D]
            scores = torch.matmul(q.view(n, Hkv, g, D), keys.transpose(-1, -2)).float() * self.scaling + bias
            probs = torch.softmax(scores, -1).to(self.dtype)
            att = torch.matmul(probs, values).reshape(n, H * D)  # [n, Hkv, g, D] -> heads in HF's order
            h = h + F.linear(att, lay.wo)
            h = h + self._mlp(i, h)
        return self.logits(h)

    # -- slot housekeeping -----------------------------------------------------------------------
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (to keep live slots 0..n-1)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
