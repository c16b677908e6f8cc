"""The bundled model's GGUF -> HF directory: exact weights, the images' two-step materialisation,
and clear errors for a broken file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selflearn import basemodel


def test_weights_match_gguf_py_reference_bit_for_bit():
    # gguf-py's numpy dequantisers and transformers' q/k un-permutation are the reference our
    # faster reader must reproduce exactly: one tensor of each kind the file holds.
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    ours = basemodel.embedded_state_dict()
    assert len(ours) == 272 and all(t.dtype == torch.float32 for t in ours.values())
    reader = GGUFReader(str(basemodel._gguf_path()))
    by_name = {t.name: t for t in reader.tensors}
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    cases = {
        "token_embd.weight": "model.embed_tokens.weight",                    # Q8_0
        "blk.7.attn_q.weight": "model.layers.7.self_attn.q_proj.weight",     # Q4_1, un-permuted (9 heads)
        "blk.7.attn_k.weight": "model.layers.7.self_attn.k_proj.weight",     # Q4_1, un-permuted (3 kv heads)
        "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",    # Q4_1
        "output_norm.weight": "model.norm.weight",                           # F32
    }
    for gguf_name, hf_name in cases.items():
        t = by_name[gguf_name]
        ref = proc.process(dequantize(t.data, t.tensor_type), gguf_name).weights
        assert torch.equal(ours[hf_name], torch.from_numpy(np.array(ref))), hf_name


def test_weights_are_written_beside_build_time_metadata(tmp_path, monkeypatch, embedded_model_dir):
    # What the images do: config and tokenizer at build time, the weights at first use in a pod.
    monkeypatch.setenv("SELFLEARN_CACHE", str(tmp_path))
    dest = basemodel.embedded_dir()
    dest.mkdir(parents=True)
    for f in Path(embedded_model_dir).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dest / f.name)
    assert basemodel.resolve(basemodel.EMBEDDED_MODEL) == str(dest)
    ref = load_file(str(Path(embedded_model_dir) / "model.safetensors"))
    got = load_file(str(dest / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_broken_gguf_files_give_one_clear_error(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        basemodel._read_gguf(not_gguf)
    data = basemodel._gguf_path().read_bytes()
    for cut in (1_000, 50_000_000):  # in the header (the vocabulary), in the tensor data
        truncated = tmp_path / f"t{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="is truncated"):
            basemodel._read_gguf(truncated)


def test_an_unwritable_cache_says_which_setting_to_change(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("SELFLEARN_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(ValueError, match="point SELFLEARN_CACHE at a writable directory"):
        basemodel.resolve(basemodel.EMBEDDED_MODEL)
