"""The fine-tuning loop, readable top to bottom (nanoGPT-style), plus perplexity.

Precision strategy:
  * CUDA: fp32 weights, autocast to bf16/fp16 (GradScaler for fp16).
  * CPU bf16: the model itself runs in bf16 (no per-op casts, half the memory traffic) while the
    optimizer updates fp32 master copies. Pure bf16 updates would vanish: at lr 2e-5 an Adam step
    is ~1e-4 of a weight, below bf16's 2^-8 resolution.
  * fp32: plain.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import attention as chunked_attention
from .data import Block, count_tokens, ids_and_labels, loss_tokens
from .loss import causal_lm_loss, supports_fused_loss, unwrap_peft

log = logging.getLogger("selflearn.trainer")


@dataclass
class LoopConfig:
    epochs: float = 1.0
    gradient_accumulation: int = 4
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    precision: str = "fp32"  # resolved: bf16 | fp16 | fp32
    max_grad_norm: float = 1.0
    seed: int = 0
    compile: str = "auto"  # auto | on | off: compile the repeated decoder blocks (see compiled_blocks)


@dataclass
class LoopStats:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # one per optimizer step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def final_loss(self) -> float | None:
        tail = self.losses[-max(1, len(self.losses) // 4):]
        return sum(tail) / len(tail) if tail else None


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


class MasterWeights:
    """fp32 copies of a low-precision model's trainable parameters, which the optimizer owns."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.master = [p.detach().float().clone().requires_grad_(True) for p in params]

    @classmethod
    def for_cpu_bf16(cls, model: torch.nn.Module) -> "MasterWeights":
        """Take exact fp32 masters from a fp32 model, then run the model itself in bf16."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        mw = cls(trainable)
        model.to(torch.bfloat16)
        return mw

    @torch.no_grad()
    def restore_fp32(self, model: torch.nn.Module) -> None:
        """Back to an fp32 model holding the exact master weights (what a checkpoint saves)."""
        model.float()
        for m, p in zip(self.master, self.params):
            p.copy_(m)

    def grads_to_master(self) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for m, p in zip(self.master, self.params):
            p.copy_(m)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated transformer blocks (HF names their class in `_no_split_modules`)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_wanted(setting: str, device: torch.device) -> bool:
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"unknown compile setting {setting!r}; choose auto, on or off")
    if setting != "auto":
        return setting == "on"
    if os.environ.get("SELFLEARN_COMPILE") in ("0", "off"):
        return False
    if device.type == "cpu":  # inductor writes C++ for the CPU: without a compiler it cannot help
        return shutil.which(os.environ.get("CXX", "g++")) is not None
    if device.type == "cuda":  # triton builds a small C launcher per kernel
        return any(shutil.which(c) for c in (os.environ.get("CC", "gcc"), "cc", "clang"))
    return False


def _uncompile(blocks: list[torch.nn.Module]) -> None:
    for b in blocks:
        b._compiled_call_impl = None  # what nn.Module.compile set; None is the eager default


def _use_persistent_compile_cache() -> None:
    """Keep compiled kernels beside the model cache rather than in /tmp, unless the user chose.

    Every round is a fresh process; with the kernels on disk only the first round on a machine
    pays the compile (~30 s cold here), later ones load them (~2 s). torch sets the variable to
    its /tmp default the first time it asks, so that value counts as not chosen.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ..basemodel import cache_root

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") not in (None, default_cache_dir()):
        return
    d = cache_root() / "torch-compile"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # read-only home: the /tmp default still works
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(d)


@contextmanager
def _isa_probes_skipped():
    """Trust /proc/cpuinfo for the vector ISA instead of inductor's per-process probes.

    Before its first CPU kernel, inductor builds a test program per candidate ISA and loads each
    in a new Python process: about a second, paid again by every round's process. The candidates
    are already filtered by the CPU's own flags; a compiler that cannot build one fails the
    compile, and the loop then trains eagerly. A user's TORCHINDUCTOR_VEC_ISA_OK still wins.
    """
    from torch._inductor import config

    if config.cpp.vec_isa_ok is not None:
        yield
        return
    with config.patch({"cpp.vec_isa_ok": True}):
        yield


def _compile_block(block: torch.nn.Module) -> None:
    """Compile `block` (as nn.Module.compile does) with only its batch dimension dynamic.

    Balanced batching makes two batch sizes (13 blocks at 4 -> 4, 3, 3, 3): marking the batch
    dimension dynamic up front compiles one graph for both instead of one per size; every other
    dimension (the block length, the width) stays static, which is what keeps kernels fast.
    """
    compiled = torch.compile(block._call_impl)

    def call(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            torch._dynamo.maybe_mark_dynamic(hidden, 0)
        return compiled(*args, **kwargs)

    block._compiled_call_impl = call


@contextmanager
def compiled_blocks(model: torch.nn.Module, enabled: bool):
    """Regional compilation: compile each repeated block, which share one compiled graph.

    Compiling one block instead of the whole model keeps compile time to seconds, and fuses the
    elementwise work between the matmuls (norms, rotary, activations, residuals), which on a CPU is
    a real share of a step. Shapes are static but for the batch dimension; a shorter tail block
    runs eagerly. Undone on exit, so evaluation runs eagerly.
    """
    blocks = repeated_blocks(model) if enabled else []
    if blocks:
        _use_persistent_compile_cache()
    inner = unwrap_peft(model)
    attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    # On a CPU, PyTorch's bf16 flash-attention kernel is slower than attention as bf16 batched
    # matmuls with the softmax between them fused by the compiler, and dense causal attention
    # computes the masked half too: train with the chunked causal kernel (see attention.py).
    device_type = next(model.parameters()).device.type
    swap_attn = bool(blocks) and attn in ("sdpa", "eager") and device_type == "cpu" \
        and hasattr(inner, "set_attn_implementation")
    if swap_attn:
        inner.set_attn_implementation(chunked_attention.register())
    for b in blocks:
        _compile_block(b)
    try:
        with _isa_probes_skipped() if blocks and device_type == "cpu" else nullcontext():
            yield bool(blocks)
    finally:
        _uncompile(blocks)
        if swap_attn:
            inner.set_attn_implementation(attn)


def train(
    model: torch.nn.Module,
    batches: Sequence[Block],
    cfg: LoopConfig,
    *,
    master: MasterWeights | None = None,
    on_step: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> LoopStats:
    """Fine-tune `model` in place on [B, T] batches: token ids (causal LM loss on every token) or
    (ids, labels) pairs (loss only where labels are not -100: a chat example's answer)."""
    if not batches:  # e.g. a round of thumbs alone: nothing to train on before its preference phase
        return LoopStats()
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if master is None and trainable and trainable[0].dtype != torch.float32:
        master = MasterWeights(trainable)
    opt_params = master.master if master else trainable
    decay = [p for p in opt_params if p.dim() >= 2]
    no_decay = [p for p in opt_params if p.dim() < 2]  # norms and biases are not decayed
    # fused: one pass over params, grads and moments instead of several (~5x faster step on a CPU).
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                            fused=opt_params[0].dtype == torch.float32 if opt_params else None)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.precision == "fp16" else None

    # Order: every epoch walks all batches (a fractional epoch walks a prefix of the last pass).
    n_micro = max(1, math.ceil(len(batches) * cfg.epochs))
    total_steps = max(1, math.ceil(n_micro / cfg.gradient_accumulation))
    warmup = int(total_steps * cfg.warmup_ratio)

    def lr_at(step: int) -> float:  # linear warmup, then linear decay (the HF Trainer default)
        if step < warmup:
            return cfg.learning_rate * (step + 1) / warmup
        return cfg.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    while len(order) < n_micro:
        order += torch.randperm(len(batches), generator=gen).tolist()
    order = order[:n_micro]

    stats = LoopStats()
    model.train()
    fused_loss = supports_fused_loss(model)
    main_len = max((ids_and_labels(b)[0].shape[1] for b in batches), default=None)  # a shorter tail runs eagerly

    def window_loss(window: list[Block], compiled: bool) -> float:
        """Forward and backward over one accumulation window; returns its token-weighted loss."""
        # Each micro-batch's mean loss is weighted by its share of the window's predicted tokens,
        # so a short tail block counts for exactly its tokens.
        window_tokens = max(1, sum(loss_tokens(b) for b in window))
        total = 0.0
        for b in window:
            ids, labels = ids_and_labels(b)
            ids = ids.to(device)
            labels = labels.to(device) if labels is not None else None
            eager = compiled and ids.shape[1] != main_len
            with _autocast(device, cfg.precision), \
                    (torch.compiler.set_stance("force_eager") if eager else nullcontext()):
                loss = causal_lm_loss(model, ids, labels=labels, fused=fused_loss, compiled=compiled)
                weight = loss_tokens(b) / window_tokens
                scaled = loss * weight
                (scaler.scale(scaled) if scaler else scaled).backward()
            total += loss.item() * weight
        return total

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="train", unit="step", leave=False)
    with compiled_blocks(model, compile_wanted(cfg.compile, device)) as compiled:
        t0 = time.perf_counter()
        for step in range(total_steps):
            window = [batches[i] for i in order[step * cfg.gradient_accumulation:(step + 1) * cfg.gradient_accumulation]]
            try:
                step_loss = window_loss(window, compiled)
            except Exception as err:
                if not compiled:
                    raise
                # A compiler problem (no toolchain, an op it cannot handle, at the first step or
                # at a new batch shape) must not fail a round: the optimizer has not stepped on
                # this window, so drop its partial gradients and redo it eagerly, as all from now on.
                log.warning("compiled training failed, continuing eagerly: %s: %s", type(err).__name__,
                            str(err).splitlines()[0] if str(err) else "")
                _uncompile(repeated_blocks(model))
                compiled = False
                model.zero_grad(set_to_none=True)
                step_loss = window_loss(window, compiled)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            if master:
                master.grads_to_master()
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(opt_params, cfg.max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if master:
                master.master_to_model()
            stats.steps += 1
            stats.tokens += count_tokens(window)
            stats.losses.append(step_loss)
            stats.seconds = time.perf_counter() - t0
            event = {"event": "step", "step": step + 1, "of": total_steps, "loss": round(step_loss, 4),
                     "lr": lr_at(step), "tokens_per_s": round(stats.tokens_per_s, 1),
                     "eta_s": round(stats.seconds / (step + 1) * (total_steps - step - 1), 1)}
            log.debug(json.dumps(event))
            if on_step:
                on_step(event)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{stats.tokens_per_s:.0f}")
    if bar:
        bar.close()
    model.eval()
    return stats


@torch.inference_mode()
def perplexity(model: torch.nn.Module, batches: Sequence[Block], precision: str = "fp32") -> float | None:
    """Token-weighted perplexity of `model` over [B, T] batches (of the labelled tokens, for
    (ids, labels) batches); None for an empty set."""
    if not batches:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for b in batches:
        ids, labels = ids_and_labels(b)
        k = loss_tokens(b)
        if not k:
            continue
        ids = ids.to(device)
        with _autocast(device, precision):
            loss = model(input_ids=ids, labels=ids if labels is None else labels.to(device)).loss.float().item()
        nll += loss * k
        n += k
    if was_training:
        model.train()
    return math.exp(nll / n) if n else None
