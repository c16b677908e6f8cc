"""Load the weights a round starts from, and save what it produced (full or LoRA)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import basemodel
from ..checkpoints import CheckpointRef, CheckpointStore
from ..spec import LearnerRunSpec

log = logging.getLogger("selflearn.trainer")


def fetch_checkpoint(ref: CheckpointRef, store: CheckpointStore, dest: Path) -> dict:
    """Download and verify `ref` (from `store`, or the store its URI names), without the serving
    engine's copy of the weights (its OpenVINO IR): training reads the HF weights alone."""
    from ..openvino_ir import CHECKPOINT_SUBDIR

    if not ref.uri.startswith(store.uri + "/"):
        store, _, _ = CheckpointStore.for_checkpoint(ref.uri, endpoint=getattr(store.backend, "endpoint", None))
    return store.download(ref, dest, skip=(f"{CHECKPOINT_SUBDIR}/*",))


def load_checkpoint_model(path: Path, manifest: dict, *, trainable_adapter: bool = False):
    """A model from a downloaded checkpoint; adapter-only checkpoints load over their base model."""
    if manifest.get("adapter"):
        from peft import PeftModel

        base = basemodel.load_model(manifest["base_model"])
        return PeftModel.from_pretrained(base, str(path), is_trainable=trainable_adapter)
    return basemodel.load_model(str(path))


def load_for_training(spec: LearnerRunSpec, parent: CheckpointRef | None, store: CheckpointStore,
                      dest: Path, device: torch.device):
    """-> (fp32 model on `device` with the right parameters trainable, tokenizer)."""
    lora = spec.training.method == "lora"
    if parent is not None:
        manifest = fetch_checkpoint(parent, store, dest)
        log.info("training from %s", parent.uri)
        model = load_checkpoint_model(dest, manifest, trainable_adapter=lora and not spec.training.lora.merge)
        tok = basemodel.load_tokenizer(str(dest)) if (dest / "tokenizer_config.json").is_file() \
            else basemodel.load_tokenizer(spec.base_model)
    else:
        log.info("training from base model %s", spec.base_model)
        model = basemodel.load_model(spec.base_model)
        tok = basemodel.load_tokenizer(spec.base_model)
    if lora and not hasattr(model, "peft_config"):
        from peft import LoraConfig, get_peft_model

        lc = spec.training.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config.use_cache = False  # no KV cache while training: it only costs memory
    return model.to(device), tok


def reload_for_training(spec: LearnerRunSpec, parent: CheckpointRef | None, dest: Path, device: torch.device):
    """The round's starting model again, from the parent already downloaded into `dest` (a full
    fine-tune: what FSDP's gathered weights are loaded into)."""
    model = basemodel.load_model(str(dest) if parent is not None else spec.base_model)
    model.config.use_cache = False
    return model.to(device)


def save_for_checkpoint(model, tok, spec: LearnerRunSpec, out: Path) -> None:
    """Save fp32 weights (safetensors) + tokenizer; LoRA is merged or saved as an adapter."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu")
    if hasattr(model, "peft_config"):
        if spec.training.lora.merge:
            model = model.merge_and_unload()
        else:
            model.save_pretrained(out)  # adapter only: adapter_config.json + adapter_model.safetensors
            tok.save_pretrained(out)
            return
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
