"""Loading weights for the OpenVINO engine: the IR a checkpoint carries (else one exported here),
quantised if asked, behind an OpenVINO GenAI pipeline (see openvino_engine.py and docs/serving.md).

`loader.load` decides the engine (`loader.pick_engine`) and calls `load` here for openvino.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from filelock import FileLock

from .. import basemodel, openvino_ir
from .config import EngineOptions, ModelConfig
from .loader import LoadedModel, cache_dir, device, eos_ids, prune, tokenizer_of

log = logging.getLogger(__name__)


def unavailable() -> str | None:
    """Why the OpenVINO engine cannot run in this process, whatever the model (None: it can)."""
    from . import openvino_engine
    from ..machine import available_cpus

    why = openvino_engine.available()
    if why is None and available_cpus() < openvino_engine.MIN_CPUS:
        why = openvino_engine.ONE_CPU
    if why is None and device().type != "cpu":
        why = f"the model runs on {device().type}, and the OpenVINO engine is for CPUs"
    return why


def _made_once(options: EngineOptions, name: str, make: Callable[[Path], object],
               keep: tuple[str, ...] = ()) -> Path:
    """Directory `name` of the serving cache's openvino/, made by `make(dest)` unless a replica on
    this node already did (a file lock between them); older ones beyond a few are pruned."""
    root = cache_dir(options) / "openvino"
    dest = root / name
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{dest.name}.lock"):
        if not openvino_ir.is_exported(dest):
            make(dest)
    prune(root, keep={dest.name, *keep})
    return dest


def ir_dir(cfg: ModelConfig, options: EngineOptions, path: Path | None, manifest: dict | None,
           base_id: str) -> Path:
    """Where the IR of these weights is, exporting it first if nobody has: the checkpoint's own
    (the trainer exports at publish, verified by sha256 with the weights), else an export into the
    serving cache, keyed by the weights' checksums (a base model: by its id), made once per node."""
    if path is not None and openvino_ir.is_exported(path / openvino_ir.CHECKPOINT_SUBDIR):
        return path / openvino_ir.CHECKPOINT_SUBDIR
    if path is not None:
        files = (manifest or {}).get("files") or {}
        key = json.dumps({k: v.get("sha256") for k, v in sorted(files.items()) if isinstance(v, dict)})
    else:
        key = f"base:{base_id}"

    def export(dest: Path) -> None:
        log.info("%s carries no OpenVINO IR: exporting it (once per node)", cfg.checkpoint or base_id)
        openvino_ir.export(path if path is not None else basemodel.resolve(base_id), dest)

    return _made_once(options, hashlib.sha256(key.encode()).hexdigest()[:20], export)


def quantized(ir: Path, scheme: str, options: EngineOptions) -> Path:
    """`ir` with its weights quantised by `scheme`, made once per node into the serving cache
    (keyed by the IR's own files: a new checkpoint is a new key)."""
    weights = ir / "openvino_model.bin"
    key = f"{ir.resolve()}|{weights.stat().st_size}|{weights.stat().st_mtime_ns}|{scheme}"
    return _made_once(options, f"{hashlib.sha256(key.encode()).hexdigest()[:20]}-{scheme}",
                      lambda dest: openvino_ir.quantize(ir, dest, scheme), keep=(ir.name,))


def load(cfg: ModelConfig, options: EngineOptions, path: Path | None, manifest: dict | None,
         base_id: str, tok_src: str, ckpt_id: str, uri: str | None) -> LoadedModel:
    from transformers import GenerationConfig

    from ..machine import available_cpus
    from .openvino_engine import MIN_CPUS, load_pipeline

    ir = ir_dir(cfg, options, path, manifest, base_id)
    if cfg.quantization != "none":
        ir = quantized(ir, cfg.quantization, options)
    pipeline = load_pipeline(ir, options, max(MIN_CPUS, options.torch_threads or available_cpus()))
    tok = tokenizer_of(tok_src)
    try:
        gen = GenerationConfig.from_pretrained(str(ir))
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        gen = None
    config = basemodel.load_config(str(ir))
    return LoadedModel(
        model=None, tokenizer=tok, checkpoint_id=ckpt_id, uri=uri, base_model=base_id,
        dtype="f16" if cfg.quantization == "none" else cfg.quantization,
        context_length=basemodel.context_length(config), chat_template=bool(getattr(tok, "chat_template", None)),
        eos_ids=eos_ids(tok, gen), cache_kw="past_key_values", manifest=manifest, engine="openvino",
        pipeline=pipeline)


def warm_up(lm: LoadedModel) -> None:
    """A prefill and a decode step through the engine's own batch, so the first user does not pay
    for the pipeline's first kernels."""
    from .batch import Ticket
    from .openvino_engine import OpenVinoBatch
    from .sampling import SamplingParams

    hi = [{"role": "user", "content": "Hi"}]
    ticket = Ticket(hi, SamplingParams(max_new_tokens=2), lambda ev: None)
    ticket.start(lm, 0, 0)
    batch = OpenVinoBatch(lm)
    batch.add(ticket, lm.render(hi))
    for _ in range(8):  # bounded whatever the pipeline does
        if not batch.rows:
            break
        batch.step()
