"""The fine-tuning loop, readable top to bottom (nanoGPT-style), plus perplexity.

Precision strategy:
  * CUDA: fp32 weights, autocast to bf16/fp16 (GradScaler for fp16).
  * CPU bf16: the model itself runs in bf16 (no per-op casts, half the memory traffic) while the
    optimizer updates fp32 master copies. Pure bf16 updates would vanish: at lr 2e-5 an Adam step
    is ~1e-4 of a weight, below bf16's 2^-8 resolution.
  * fp32: plain.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch

from ..contracts import ProgressEvent, StepDone
from . import distributed
from .compiled import uncompile, compile_wanted, compiled_blocks, repeated_blocks
from .data import Block, count_tokens, ids_and_labels, loss_tokens
from .distributed import SOLO, World
from .loss import causal_lm_loss, supports_fused_loss

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
    # Bytes this rank held after the first step: parameters (with fp32 masters), gradients,
    # optimizer state (a shard's local part under FSDP).
    held_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def final_loss(self) -> float | None:
        tail = self.losses[-max(1, len(self.losses) // 4):]
        return sum(tail) / len(tail) if tail else None


def _autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
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


@dataclass
class _Optimizer:
    """AdamW over the trainable parameters (or their fp32 masters), and fp16's grad scaler."""

    opt: torch.optim.Optimizer
    params: list[torch.Tensor]  # what the optimizer updates
    master: MasterWeights | None
    scaler: Any

    @classmethod
    def for_model(cls, model: torch.nn.Module, cfg: LoopConfig, master: MasterWeights | None,
                  device: torch.device) -> _Optimizer:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if master is None and trainable and trainable[0].dtype != torch.float32:
            master = MasterWeights(trainable)
        params: list[torch.Tensor] = list(master.master if master else trainable)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # norms and biases are not decayed
        # fused: one pass over params, grads and moments instead of several (~5x faster step on a CPU).
        sharded = bool(params) and hasattr(params[0], "to_local")  # FSDP's DTensors: the foreach path
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                fused=params[0].dtype == torch.float32 and not sharded if params else None)
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.precision == "fp16" else None
        return cls(opt, params, master, scaler)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr: float, max_grad_norm: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.master:
            self.master.grads_to_master()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.master:
            self.master.master_to_model()


@dataclass(frozen=True)
class _Schedule:
    """Which micro-batches each optimizer step takes, and its learning rate."""

    order: list[int]  # micro-batch indices: every epoch walks all batches, shuffled
    total_steps: int
    warmup: int
    cfg: LoopConfig

    @classmethod
    def plan(cls, n_batches: int, cfg: LoopConfig) -> _Schedule:
        # A fractional epoch walks a prefix of the last pass.
        n_micro = max(1, math.ceil(n_batches * cfg.epochs))
        total_steps = max(1, math.ceil(n_micro / cfg.gradient_accumulation))
        gen = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        while len(order) < n_micro:
            order += torch.randperm(n_batches, generator=gen).tolist()
        return cls(order[:n_micro], total_steps, int(total_steps * cfg.warmup_ratio), cfg)

    def window(self, step: int) -> list[int]:
        k = self.cfg.gradient_accumulation
        return self.order[step * k:(step + 1) * k]

    def lr_at(self, step: int) -> float:
        """Linear warmup, then linear decay (the HF Trainer default)."""
        lr = self.cfg.learning_rate
        if step < self.warmup:
            return lr * (step + 1) / self.warmup
        return lr * max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup))


@dataclass(frozen=True)
class _Forward:
    """How the model runs forward and backward in this loop."""

    model: torch.nn.Module  # what forward runs through: the model, or its DDP/FSDP wrapper
    optim: _Optimizer
    device: torch.device
    precision: str
    fused_loss: bool
    main_len: int | None  # the batches' full length: a shorter tail runs eagerly when compiled
    world: World = SOLO

    def _loss(self, ids: torch.Tensor, labels: torch.Tensor | None, compiled: bool) -> torch.Tensor:
        if self.world.distributed:
            return self.model(ids, labels, compiled)  # distributed.LossOf, inside DDP or FSDP
        return causal_lm_loss(self.model, ids, labels=labels, fused=self.fused_loss, compiled=compiled)

    def window_loss(self, window: list[Block], compiled: bool) -> float:
        """Forward and backward over one accumulation window; returns its token-weighted loss.

        With several ranks each takes its share of the window; DDP and FSDP average the ranks'
        gradients, so each loss is scaled by the world size to sum them as one process would."""
        # Each micro-batch's mean loss is weighted by its share of the window's predicted tokens,
        # so a short tail block counts for exactly its tokens.
        window_tokens = max(1, sum(loss_tokens(b) for b in window))
        mine, short = distributed.shard(self.world, window)
        work = [(b, loss_tokens(b) / window_tokens) for b in mine] + [(window[0], 0.0)] * short
        total = 0.0
        for i, (b, weight) in enumerate(work):
            ids, labels = ids_and_labels(b)
            ids = ids.to(self.device)
            labels = labels.to(self.device) if labels is not None else None
            eager = compiled and ids.shape[1] != self.main_len
            with _autocast(self.device, self.precision), \
                    (torch.compiler.set_stance("force_eager") if eager else nullcontext()), \
                    distributed.gradient_sync(self.model, on=i == len(work) - 1):
                loss = self._loss(ids, labels, compiled)
                self.optim.backward(loss * (weight * self.world.size))
            total += loss.item() * weight
        return distributed.summed(self.world, [total])[0]


def _held_bytes(module: torch.nn.Module, optim: _Optimizer) -> dict[str, int]:
    held = distributed.held_bytes(module, optim.opt)
    if optim.master:  # the fp32 copies the optimizer updates
        held["parameters"] += sum(m.numel() * m.element_size() for m in optim.master.master)
    return held


def train(
    model: torch.nn.Module,
    batches: Sequence[Block],
    cfg: LoopConfig,
    *,
    master: MasterWeights | None = None,
    on_step: Callable[[ProgressEvent], None] | None = None,
    kind: str = "train",
    world: World = SOLO,
) -> LoopStats:
    """Fine-tune `model` in place on [B, T] batches: token ids (causal LM loss on every token) or
    (ids, labels) pairs (loss only where labels are not -100: a chat example's answer). Each
    optimizer step is told to `on_step` as a `StepDone` of `kind` (train | corrections).

    With several ranks (`world`), every rank calls this with the same batches and trains its
    share of each window through DDP or FSDP (distributed.py); under FSDP `model` is left
    sharded in place: `distributed.full_state_dict(model)` has its weights whole."""
    if not batches:  # e.g. a round of thumbs alone: nothing to train on before its preference phase
        return LoopStats()
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    fused = supports_fused_loss(model)
    want_compile = compile_wanted(cfg.compile, device)
    runs: torch.nn.Module = model
    if world.distributed:
        if world.strategy == "fsdp":
            want_compile = False  # each shard's all-gather hooks around compiled blocks: not tried yet
            if master is not None:  # FSDP keeps fp32 shards and computes in bf16 itself
                master.restore_fp32(model)
                master = None
        runs = distributed.wrap(world, model, partial(causal_lm_loss, fused=fused), repeated_blocks(model),
                                cfg.precision)
    if world.size > cfg.gradient_accumulation:
        log.warning("%d ranks share %d micro-batch(es) a step: %d rank(s) idle through every step; make "
                    "training.gradientAccumulation a multiple of the ranks", world.size,
                    cfg.gradient_accumulation, world.size - cfg.gradient_accumulation)
    optim = _Optimizer.for_model(model, cfg, master, device)
    plan = _Schedule.plan(len(batches), cfg)
    stats = LoopStats()
    model.train()
    forward = _Forward(runs, optim, device, cfg.precision, fused_loss=fused,
                       main_len=max((ids_and_labels(b)[0].shape[1] for b in batches), default=None), world=world)
    with compiled_blocks(model, want_compile) as compiled:
        t0 = time.perf_counter()
        for step in range(plan.total_steps):
            window = [batches[i] for i in plan.window(step)]
            try:
                step_loss = forward.window_loss(window, compiled)
            except Exception as err:
                if not compiled or world.distributed:  # a rank redoing a window alone would desync the others
                    raise
                # A compiler problem (no toolchain, an op it cannot handle, at the first step or
                # at a new batch shape) must not fail a round: the optimizer has not stepped on
                # this window, so drop its partial gradients and redo it eagerly, as all from now on.
                log.warning("compiled training failed, continuing eagerly: %s: %s", type(err).__name__,
                            str(err).splitlines()[0] if str(err) else "")
                uncompile(repeated_blocks(model))
                compiled = False
                model.zero_grad(set_to_none=True)
                step_loss = forward.window_loss(window, compiled)
            grads = None if stats.held_bytes else _held_bytes(model, optim)["gradients"]  # before the step frees them
            optim.step(plan.lr_at(step), cfg.max_grad_norm)
            if grads is not None:
                stats.held_bytes = {**_held_bytes(model, optim), "gradients": grads}
            stats.steps += 1
            stats.tokens += count_tokens(window)
            stats.losses.append(step_loss)
            stats.seconds = time.perf_counter() - t0
            event = StepDone(step + 1, plan.total_steps, round(step_loss, 4), kind=kind, lr=plan.lr_at(step),
                             tokens_per_s=round(stats.tokens_per_s, 1),
                             eta_s=round(stats.seconds / (step + 1) * (plan.total_steps - step - 1), 1))
            log.debug("%s", event)
            if on_step:
                on_step(event)
    model.eval()
    return stats


@torch.inference_mode()
def perplexity(model: torch.nn.Module, batches: Sequence[Block], precision: str = "fp32",
               world: World = SOLO) -> float | None:
    """Token-weighted perplexity of `model` over [B, T] batches (of the labelled tokens, for
    (ids, labels) batches); None for an empty set. With several ranks each measures its share
    of the batches (a whole model on each) and the sums are added up."""
    if not batches:
        return None
    batches, _ = distributed.shard(world, batches)
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
    total, count = distributed.summed(world, [nll, n])
    return math.exp(total / count) if count else None
