"""Turn a `ModelConfig` into a `LoadedModel`: verified checkpoint or base model, tokenizer, prompt format.

A checkpoint is fetched with `CheckpointStore.download`, which checks every file's sha256 and size
against the manifest before anything is loaded; a mismatch, a missing manifest or an unreachable
store raises and the caller keeps the weights it has. LoRA checkpoints saved as a bare adapter
(`adapter_config.json`) are merged into their base model at load time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from .. import basemodel, contracts
from ..memory import Memory
from ..prompting import PLAIN_STOP, render_prompt
from .config import EngineOptions, ModelConfig

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    """The newest message alone does not fit the context next to the requested new tokens.

    Carries the figures; the engine, which knows the effective context, words the error."""

    def __init__(self, prompt_tokens: int, budget: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens, over the {budget} tokens left for it")
        self.prompt_tokens, self.budget = prompt_tokens, budget


def pick_dtype(name: str):
    """The weights' dtype for `EngineOptions.dtype` (auto | bf16 | fp16 | fp32) on this device."""
    from .. import precision

    return precision.dtype_of(precision.resolve(name, precision.pick_device(), training=False))


def device():
    from .. import precision

    return precision.pick_device()


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    checkpoint_id: str
    uri: str | None
    base_model: str
    dtype: str
    context_length: int
    chat_template: bool
    eos_ids: frozenset
    cache_kw: str
    manifest: dict | None = None
    engine: str = "torch"  # what decodes: torch (`model`) or openvino (`pipeline`, and `model` is None)
    pipeline: Any = None  # openvino_genai.ContinuousBatchingPipeline
    memory: Memory | None = None  # what its rounds learned, searched at answer time (None: it keeps none)
    load_seconds: float = 0.0
    loaded_at: float = field(default_factory=time.time)

    @property
    def default_stop(self) -> tuple[str, ...]:
        return () if self.chat_template else (PLAIN_STOP,)

    # -- prompts ---------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> list[int]:
        return render_prompt(self.tokenizer, messages)  # exactly what the trainer teaches

    def encode(self, messages: list[dict[str, str]], budget: int) -> tuple[list[int], int]:
        """Token ids of the prompt, dropping the oldest turns until it fits `budget` tokens.

        Returns (ids, number of messages dropped). The system message and the newest user message
        are never dropped; if those alone do not fit, PromptTooLong.
        """
        messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                    for m in messages]
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        rest = messages[len(system):]
        dropped = 0
        while True:
            ids = self.render(system + rest)
            if len(ids) <= budget or len(rest) <= 1:
                break
            # Drop the oldest exchange: up to (not including) the next user message.
            cut = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), len(rest) - 1)
            rest, dropped = rest[cut:], dropped + cut
        if len(ids) > budget:
            raise PromptTooLong(len(ids), budget)
        return ids, dropped

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


# What turns a config into weights: `load`, or a test's wrapper around it.
Load = Callable[[ModelConfig, EngineOptions], LoadedModel]


# -- loading -----------------------------------------------------------------------------------------
def cache_dir(options: EngineOptions) -> Path:
    return Path(options.cache_dir).expanduser() if options.cache_dir else basemodel.cache_root() / "serving"


def fetch_checkpoint(cfg: ModelConfig, options: EngineOptions) -> tuple[Path, dict, str]:
    """Download and verify `cfg.checkpoint`; returns (local dir, manifest, checkpoint id)."""
    from ..checkpoints import CheckpointStore

    assert cfg.checkpoint
    store, run, round_ = CheckpointStore.for_checkpoint(cfg.checkpoint, endpoint=cfg.storage_endpoint,
                                                        region=cfg.storage_region)
    ref = store.ref(run, round_)
    root = cache_dir(options)
    dest = root / hashlib.sha256(ref.uri.encode()).hexdigest()[:20]
    lock = root / f".{dest.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):  # replicas on one node share the download
        manifest = store.download(ref, dest, skip=_left_out(cfg, store.manifest(ref)))
        os.utime(dest)  # newest = last fetched: a rollback's checkpoint is not the first pruned
    prune(root, keep={dest.name, "openvino"})  # openvino/: IR made here, pruned on its own
    return dest, manifest, ref.id


# The HF weights' files: a replica serving a checkpoint's published IR needs none of them.
_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def _left_out(cfg: ModelConfig, manifest: dict) -> tuple[str, ...]:
    """What of a checkpoint this replica need not download: the HF weights where it will serve the
    checkpoint's own OpenVINO IR (a swap fetched 780 MB instead of 265: 7.3 s of a 9.5 s swap
    under load), the IR where it will serve on torch."""
    from .. import openvino_ir
    from . import openvino_loader

    files = manifest.get("files") or {}
    has_ir = f"{openvino_ir.CHECKPOINT_SUBDIR}/{openvino_ir.MARKER}" in files
    if cfg.engine == "torch" or openvino_loader.unavailable() is not None:
        return (f"{openvino_ir.CHECKPOINT_SUBDIR}/*",)
    return _HF_WEIGHTS if has_ir else ()


def verify_checkpoint(cfg: ModelConfig, options: EngineOptions) -> str | None:
    """Why `cfg.checkpoint` cannot be served, in one line (None: it can, or there is none).

    The very download and checks `load` does (every file's sha256 and size, safe file names),
    into the same cache: a start-up that checks first leaves the replica a verified copy to load."""
    if not cfg.checkpoint:
        return None
    from ..checkpoints import CheckpointError

    try:
        fetch_checkpoint(cfg, options)
    except CheckpointError as err:
        return f"checkpoint failed verification: {err}"  # the message names the checkpoint
    except Exception as err:  # unreachable store, credentials, a full disk
        return f"cannot read checkpoint {cfg.checkpoint}: {type(err).__name__}: {err}"
    return None


def prune(root: Path, keep: set[str], max_dirs: int = 3, min_age_s: float = 120) -> None:
    """Best effort: drop downloaded checkpoints beyond the newest few, with their lock files.

    The cache is a node's, shared by its replicas, and every promoted round adds a checkpoint
    (260-780 MB for the embedded model): keeping an hour's worth filled CI's disk. A directory
    is spared while it is among the newest `max_dirs`, younger than `min_age_s` (a replica may
    have just fetched it and not loaded it yet), or its lock is held (a replica is fetching it)."""
    import shutil

    from filelock import Timeout

    def drop(name: str, tree: Path | None) -> None:
        lock = root / f".{name}.lock"
        try:
            with FileLock(lock, timeout=0):
                if tree is not None:
                    shutil.rmtree(tree, ignore_errors=True)
                lock.unlink(missing_ok=True)
        except Timeout:
            pass

    try:
        now = time.time()
        dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for p in dirs[max_dirs:]:
            if p.name not in keep and now - p.stat().st_mtime > min_age_s:
                drop(p.name, p)
        for lock in root.glob(".*.lock"):  # left by directories removed by hand or a crash
            name = lock.name[1:-len(".lock")]
            if name not in keep and not (root / name).exists() and now - lock.stat().st_mtime > min_age_s:
                drop(name, None)
    except OSError:
        pass


def _manifest_base_model(manifest: dict | None, fallback: str) -> str:
    m = manifest or {}
    for key in ("base_model", "baseModel"):
        if isinstance(m.get(key), str) and m[key]:
            return m[key]
    for section in ("hyperparameters", "training", "spec"):
        sub = m.get(section)
        if isinstance(sub, dict):
            for key in ("base_model", "baseModel"):
                if isinstance(sub.get(key), str) and sub[key]:
                    return sub[key]
    return fallback


def load(cfg: ModelConfig, options: EngineOptions) -> LoadedModel:
    """Load the weights `cfg` names. Raises (CheckpointError, ValueError, OSError, ...) on failure."""
    t0 = time.monotonic()
    manifest, memory, path = None, None, None
    if cfg.checkpoint:
        path, manifest, ckpt_id = fetch_checkpoint(cfg, options)
        base_id = _manifest_base_model(manifest, cfg.base_model)
        # Verified with the weights (sha256 at download); unreadable, it refuses the checkpoint too.
        memory = Memory.load(path)
        has_tok = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        tok_src = str(path) if has_tok else basemodel.resolve(base_id)
        uri = cfg.checkpoint
    else:
        base_id = cfg.base_model
        tok_src, ckpt_id, uri = basemodel.resolve(base_id), contracts.base_id(base_id), None
    engine = pick_engine(cfg.engine, path, base_id)
    if engine != "openvino" and cfg.quantization != "none":
        raise ValueError(f"quantization {cfg.quantization!r} needs the OpenVINO engine; these weights serve on "
                         f"{engine} (set quantization: none, or engine: openvino where it can run)")
    if engine == "openvino":
        from . import openvino_loader

        lm = openvino_loader.load(cfg, options, path, manifest, base_id, tok_src, ckpt_id, uri)
    else:
        lm = _load_torch(options, path, base_id, tok_src, ckpt_id, uri, manifest)
    lm.memory = memory
    _warm_up(lm)
    lm.load_seconds = time.monotonic() - t0
    log.info("loaded %s (%s, %s, %s) in %.1fs", lm.checkpoint_id, lm.engine, lm.dtype, device(), lm.load_seconds)
    return lm


def pick_engine(asked: str, path: Path | None, base_id: str) -> str:
    """The engine that decodes these weights: `asked`, or for `auto` openvino where it can run
    (a CPU, openvino installed, a model it exports) and torch elsewhere. An explicit `openvino`
    that cannot run raises ValueError with the reason, so the replica keeps the weights it has."""
    if asked == "torch":
        return "torch"
    from .. import openvino_ir
    from . import openvino_loader

    why = openvino_loader.unavailable()
    if why is None and path is not None and openvino_ir.is_exported(path / openvino_ir.CHECKPOINT_SUBDIR):
        return "openvino"  # published with its IR: exported, so exportable
    if why is None and path is not None and (path / "adapter_config.json").is_file():
        why = "the checkpoint is a bare LoRA adapter"
    if why is None:
        why = openvino_ir.unsupported(basemodel.load_config(str(path) if path is not None else base_id))
    if why is None:
        return "openvino"
    if asked == "openvino":
        raise ValueError(f"the OpenVINO engine cannot serve this model: {why}")
    log.info("serving on the torch engine: %s", why)
    return "torch"


def eos_ids(tok, generation_config) -> frozenset:
    eos: set[int] = set()
    for v in (tok.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        eos.update(v if isinstance(v, (list, tuple)) else [v] if v is not None else [])
    return frozenset(eos)


def tokenizer_of(tok_src: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_src)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_torch(options: EngineOptions, path: Path | None, base_id: str, tok_src: str, ckpt_id: str,
                uri: str | None, manifest: dict | None) -> LoadedModel:
    import inspect

    from transformers import AutoModelForCausalLM

    dtype = pick_dtype(options.dtype)
    if path is not None and (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = basemodel.load_model(base_id, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path) if path is not None else tok_src, dtype=dtype)
    tok = tokenizer_of(tok_src)
    _use_decode_attention(model)
    model.to(device()).eval()
    params = inspect.signature(model.forward).parameters
    return LoadedModel(
        model=model, tokenizer=tok, checkpoint_id=ckpt_id, uri=uri, base_model=base_id,
        dtype=str(dtype).removeprefix("torch."), context_length=basemodel.context_length(model.config),
        chat_template=bool(getattr(tok, "chat_template", None)), eos_ids=eos_ids(tok, model.generation_config),
        cache_kw="cache" if "cache" in params else "past_key_values", manifest=manifest)


def _use_decode_attention(model) -> None:
    """The decode-step attention of serving/decode.py, where the architecture takes an attention
    function from transformers' registry (llama, OPT, most others); else it keeps its own."""
    from . import decode

    try:
        model.set_attn_implementation(decode.register())
    except (ValueError, NotImplementedError) as err:
        log.info("%s keeps its attention (%s)", type(model).__name__, str(err).splitlines()[0] if str(err) else err)


def _warm_up(lm: LoadedModel) -> None:
    """One tiny prefill and decode step so the first user does not pay for kernel selection."""
    if lm.pipeline is not None:
        from . import openvino_loader

        return openvino_loader.warm_up(lm)
    import torch

    from .decode import HeadroomCache

    ids = torch.tensor([lm.render([{"role": "user", "content": "Hi"}])[-8:]] * 2, device=device())
    with torch.inference_mode():
        cache = HeadroomCache()
        out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{lm.cache_kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        lm.model(input_ids=nxt, use_cache=True, **{lm.cache_kw: cache})


def release_freed_memory() -> None:
    """Hand the memory Python and torch have freed back to the OS (glibc's `malloc_trim`).

    A swap frees a whole model and its loading's temporaries, and glibc keeps freed heap pages
    mapped. Measured on the embedded model (bf16): a replica's RSS grew 680 -> 1,160 MB over five
    swaps, peaking at 1.8 GB while loading, and stayed near 700 MB (peak 1.5 GB) when trimmed after
    each. Under the example's 3 GiB serving limit the difference let Ray's memory monitor kill the
    Serve controller and the ingress in a loop during a rollback (requests answered 500)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        pass
