"""A checkpoint as OpenVINO IR, for the OpenVINO serving engine (docs/serving.md, "Which engine").

OpenVINO GenAI's continuous-batching pipeline decodes the embedded model at 2.5-3x the torch
engine's speed on this machine's CPU (bench/engine_spike.py). It reads a *stateful* IR: the KV
cache lives in variables, each layer reads its past as `Gather(ReadValue, beam_idx)`, concatenates
the new keys and values and feeds `ScaledDotProductAttention`; at load the pipeline rewrites
exactly that pattern into paged attention. optimum-intel writes such IR, but pins a transformers
older than ours, so `export` writes it itself:

1. `_Exportable` runs the Llama-family forward over the HF modules (the same weights, the same
   arithmetic as transformers' Llama) with the past keys and values as plain inputs, written so
   that the pattern above is what tracing yields: heads repeated for GQA by unsqueeze, expand and
   reshape, lengths taken from `attention_mask` (a shape read off the cache would outlive the
   rewrite and leave the graph referring to removed inputs);
2. `openvino.convert_model` traces it; a `beam_idx` input gathers each past, and OpenVINO's own
   make-stateful pass turns past inputs / present outputs into variables, each initialised with
   zeros of shape [batch, kv_heads, 0, head_dim] (the paged-attention rewrite matches only
   variables that have an initialiser);
3. the tokenizer and detokenizer go through openvino-tokenizers, and the HF config files are
   copied beside them (the pipeline reads `generation_config.json`).

The result is tested token for token against transformers' greedy decoding
(tests/test_openvino_engine.py). Models outside the Llama family, or with a rotary embedding that
changes with the length (dynamic NTK, longrope), are refused with the reason (`unsupported`);
they serve on the torch engine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

# Written last into an exported directory: a directory without it is an export that did not finish.
MARKER = "selflearn-openvino.json"
MODEL_XML = "openvino_model.xml"
# The directory a checkpoint carries its IR in (published by the trainer, see trainer/round.py).
CHECKPOINT_SUBDIR = "openvino"
_FAMILY = ("llama", "mistral", "qwen2")
_STATIC_ROPE = (None, "default", "linear", "llama3", "yarn")


def installed() -> bool:
    """Whether this environment can export (openvino, openvino-tokenizers)."""
    try:
        import openvino  # noqa: F401
        import openvino_tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(config: Any) -> str | None:
    """Why a model with HF config `config` cannot be exported (None: it can)."""
    kind = getattr(config, "model_type", None)
    if kind not in _FAMILY:
        return f"model type {kind!r} is not of the Llama family ({', '.join(_FAMILY)})"
    if getattr(config, "mlp_bias", False):
        return "MLP projections with a bias"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if kind != "llama" and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type not in _STATIC_ROPE:
        return f"rotary embedding of type {rope_type!r} (it changes with the length)"
    return None


@contextlib.contextmanager
def _written_whole(dest: Path) -> Iterator[Path]:
    """A temporary sibling of `dest` to write into: it replaces `dest` whole when the block ends
    without an error (readers see no directory or a complete one), and is removed when it fails."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        yield tmp
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_exported(path: Path) -> bool:
    return (Path(path) / MARKER).is_file() and (Path(path) / MODEL_XML).is_file()


def _exportable(model: Any) -> Any:
    import torch
    import torch.nn.functional as F

    class _Exportable(torch.nn.Module):
        """`model`'s forward with explicit past keys/values, shaped for the stateful pattern."""

        def __init__(self, m: Any):
            super().__init__()
            self.m = m
            c = m.config
            self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
            self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
            self.eps = c.rms_norm_eps
            rotary = m.model.rotary_emb
            self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
            self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

        def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            b, s = input_ids.shape
            H, Hkv, D = self.heads, self.kv_heads, self.head_dim
            group = H // Hkv
            inv_freq = self.get_buffer("inv_freq")
            freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
            angles = torch.cat([freqs, freqs], -1)
            cos = (angles.cos() * self.rope_scale)[:, None]
            sin = (angles.sin() * self.rope_scale)[:, None]

            def rope(x: torch.Tensor) -> torch.Tensor:
                half = x.shape[-1] // 2
                return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

            # Query i (absolute position past + i) sees key j if j <= past + i and j is not padding.
            total = attention_mask.shape[1]
            q_pos = torch.arange(s)[:, None] + (total - s)
            k_pos = torch.arange(total)[None, :]
            visible = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()
            bias = torch.zeros_like(visible, dtype=torch.float32).masked_fill(~visible, torch.finfo(torch.float32).min)
            h = self.m.model.embed_tokens(input_ids)
            present: list[torch.Tensor] = []
            for i, layer in enumerate(self.m.model.layers):
                a = layer.self_attn
                x = self._rms(h, layer.input_layernorm.weight)
                q = rope(a.q_proj(x).view(b, s, H, D).transpose(1, 2))
                k = torch.cat([past[2 * i], rope(a.k_proj(x).view(b, s, Hkv, D).transpose(1, 2))], 2)
                v = torch.cat([past[2 * i + 1], a.v_proj(x).view(b, s, Hkv, D).transpose(1, 2)], 2)
                present += [k, v]
                keys, values = k, v
                if group > 1:  # with one group the pattern is the concat itself (tracing folds a no-op expand oddly)
                    keys = k[:, :, None].expand(-1, -1, group, -1, -1).reshape(b, H, -1, D)
                    values = v[:, :, None].expand(-1, -1, group, -1, -1).reshape(b, H, -1, D)
                att = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=D ** -0.5)
                h = h + a.o_proj(att.transpose(1, 2).reshape(b, s, H * D))
                mlp = layer.mlp
                x = self._rms(h, layer.post_attention_layernorm.weight)
                h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            logits = self.m.lm_head(self._rms(h, self.m.model.norm.weight))
            return (logits, *present)

    return _Exportable(model).eval()


def _stateful(ov_model: Any, past_names: list[str], present_names: list[str]) -> None:
    """Past inputs and present outputs become variables read through `Gather(., beam_idx)`."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    beam_idx = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    for name in past_names:
        param = ov_model.input(name).get_node()
        readers = list(param.output(0).get_target_inputs())
        gathered = ops.gather(param, beam_idx, ops.constant(0))
        for r in readers:
            r.replace_source_output(gathered.output(0))
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, dict(zip(past_names, present_names)))
    batch = ops.gather(ops.shape_of(ov_model.input("input_ids").get_node(), output_type="i64"),
                       ops.constant([0], dtype=np.int64), ops.constant(0, dtype=np.int64))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [batch] + [ops.constant([d.get_length() if d.is_static else 0], dtype=np.int64)
                              for d in list(op.get_output_partial_shape(0))[1:]]
            zeros = ops.broadcast(ops.constant(0.0, dtype=np.float32), ops.concat(dims, 0))
            op.set_arguments([ops.convert(zeros, op.get_output_element_type(0))])
    ov_model.validate_nodes_and_infer_types()


def export(hf_dir: str | Path, dest: str | Path) -> dict[str, Any]:
    """Write the IR of the HF model in `hf_dir` (a directory or hub id) into `dest`, replaced whole
    and atomically: readers see no directory or a complete one. Returns what the marker records. Raises ValueError for a
    model it cannot export, ImportError without openvino."""
    import openvino as ov
    import torch
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    dest = Path(dest)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    why = unsupported(model.config)
    if why:
        raise ValueError(f"cannot export {hf_dir} to OpenVINO: {why}")
    wrapped = _exportable(model)
    layers = model.config.num_hidden_layers
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    # Any small shapes do for tracing; every dimension comes out dynamic but heads and head size.
    b, s, p = 2, 3, 4
    example = (torch.ones(b, s, dtype=torch.long), torch.ones(b, p + s, dtype=torch.long),
               torch.arange(p, p + s).repeat(b, 1),
               *[torch.zeros(b, wrapped.kv_heads, p, wrapped.head_dim) for _ in past_names])
    with torch.no_grad():
        ov_model = ov.convert_model(wrapped, example_input=example)
    for port, name in zip(ov_model.inputs, ["input_ids", "attention_mask", "position_ids", *past_names]):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, ["logits", *present_names]):
        port.get_tensor().set_names({name})
    _stateful(ov_model, past_names, present_names)
    config, generation = model.config, model.generation_config
    del model, wrapped

    with _written_whole(dest) as tmp:
        ov.save_model(ov_model, str(tmp / MODEL_XML), compress_to_fp16=True)
        hf_tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        tokenizer, detokenizer = convert_tokenizer(hf_tokenizer, with_detokenizer=True)
        ov.save_model(tokenizer, str(tmp / "openvino_tokenizer.xml"))
        ov.save_model(detokenizer, str(tmp / "openvino_detokenizer.xml"))
        # The pipeline reads the config and generation_config (eos); the tokenizer files let a
        # reader of this directory alone (bench/engine_spike.py) encode prompts as we do.
        config.save_pretrained(str(tmp))
        generation.save_pretrained(str(tmp))
        hf_tokenizer.save_pretrained(str(tmp))
        info = {"format": 1, "openvino": ov.get_version(), "weights": "f16", "source": Path(str(hf_dir)).name,
                "seconds": round(time.monotonic() - t0, 2)}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
    log.info("exported %s to OpenVINO IR in %.1fs", hf_dir, info["seconds"])
    return info


# Weight-only quantisation of an exported IR (`user_config.quantization`), by NNCF, OpenVINO's own
# compression library; the CPU plugin runs the compressed weights with int8/int4 kernels.
# int8: every weight per output channel, asymmetric (NNCF INT8_ASYM).
# q4: 4-bit symmetric in groups of 64 along the input (NNCF INT4_SYM), all layers; the embedding
#     (tied to the output head here) stays int8, as NNCF keeps it by default.
QUANTIZATIONS = ("none", "int8", "q4")


def quantize(src: str | Path, dest: str | Path, scheme: str) -> dict[str, Any]:
    """Write `src`'s IR with its weights quantised by `scheme` into `dest` (atomically, as
    `export`); the tokenizer and config files come along. ValueError for an unknown scheme."""
    import nncf
    import openvino as ov

    if scheme not in QUANTIZATIONS or scheme == "none":
        raise ValueError(f"unknown quantization {scheme!r}: expected one of {', '.join(QUANTIZATIONS[1:])}")
    t0 = time.monotonic()
    src, dest = Path(src), Path(dest)
    model = ov.Core().read_model(str(src / MODEL_XML))
    if scheme == "int8":
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=64, ratio=1.0)
    with _written_whole(dest) as tmp:
        ov.save_model(model, str(tmp / MODEL_XML), compress_to_fp16=False)
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("openvino_model.") and f.name != MARKER:
                shutil.copy2(f, tmp / f.name)
        info = {**json.loads((src / MARKER).read_text()), "weights": scheme,
                "quantize_seconds": round(time.monotonic() - t0, 2)}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
    log.info("quantised %s to %s in %.1fs", src, scheme, info["quantize_seconds"])
    return info
