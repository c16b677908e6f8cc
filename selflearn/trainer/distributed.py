"""A round on several processes, with PyTorch's own distributed stack (docs/distributed.md).

`selflearn train` is one process, or one rank of many under torchrun (which sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous). Every rank runs the same round: rank 0 gathers its inputs and
builds its batches and hands them to the others (live sources would give each rank different
articles), each rank trains on its share of every accumulation window, and the gradients are
reduced by DistributedDataParallel or sharded by FSDP2 (`fully_shard`). Rank 0 alone measures
the probes, saves and publishes; the others learn the outcome from it and exit.

The math is the one-process round's: an optimizer step still takes `gradientAccumulation`
micro-batches (the global batch does not grow with the world), split across ranks, each
weighted by its share of the window's tokens; a rank short of a micro-batch runs a zero-weight
one so that every rank joins every collective.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("selflearn.trainer")

T = TypeVar("T")

STRATEGIES = ("ddp", "fsdp")
# A full fine-tune with AdamW holds ~16 bytes a parameter (fp32 weights, gradients, two moments);
# `auto` shards when that passes this share of one device's memory (activations need the rest).
FIT_SHARE = 0.6


@dataclass(frozen=True)
class World:
    """Which rank this process is, of how many, and how the ranks share the training."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # ddp | fsdp once there is more than one rank

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SOLO = World()


def launched_size() -> int:
    """How many ranks torchrun started (1 when it did not)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def join(device: torch.device, timeout_s: float) -> World:
    """Join the process group torchrun set up (SOLO when this is the only process); a collective
    that waits longer than `timeout_s` (a rank that hangs) fails the round."""
    size = launched_size()
    if size == 1:
        return SOLO
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, size=size, local_rank=local_rank)


def pick_strategy(setting: str, size: int, device: torch.device, trainable_params: int,
                  device_bytes: int | None) -> str:
    """`trainer.strategy` resolved: none for one rank; auto is fsdp where the full fine-tune's
    state would not fit one device (a GPU: on a CPU every rank shares the host's memory anyway)."""
    if size == 1:
        return "none"
    if setting in STRATEGIES:
        return setting
    if setting != "auto":
        raise ValueError(f"unknown trainer.strategy {setting!r}; choose auto, ddp or fsdp")
    if device.type == "cuda" and device_bytes and 16 * trainable_params > FIT_SHARE * device_bytes:
        return "fsdp"
    return "ddp"


def with_strategy(world: World, setting: str, model: torch.nn.Module, device: torch.device) -> World:
    if not world.distributed:
        return world
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    strategy = pick_strategy(setting, world.size, device, trainable, total)
    log.info("rank %d of %d: %s over %s", world.rank, world.size, strategy, dist.get_backend())
    return World(world.rank, world.size, world.local_rank, strategy)


class Failed(ValueError):
    """What rank 0 failed with, raised on every other rank: each ends with that one line (the
    command's clear error), not a traceback of its own."""


def from_leader(world: World, make: Callable[[], T]) -> T:
    """`make()` on rank 0, its value (or the error it raised) on every rank."""
    if not world.distributed:
        return make()
    box: list[Any] = [None]
    error: BaseException | None = None
    if world.leader:
        try:
            box = [("ok", make())]
        except Exception as err:  # the others must hear of it, or they wait for a value forever
            error = err
            box = [("error", f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise Failed(f"rank 0 failed: {value}")
    return value


def shard(world: World, items: Sequence[T]) -> tuple[list[T], int]:
    """This rank's share of `items` (every size-th from its rank) and how many it is short of
    the largest share: the zero-weight work it runs so every rank joins every collective."""
    mine = list(items[world.rank::world.size])
    return mine, math.ceil(len(items) / world.size) - len(mine)


def gathered(world: World, mine: dict[Any, T]) -> dict[Any, T]:
    """Every rank's `mine` (keys distinct across ranks) merged, on every rank."""
    if not world.distributed:
        return dict(mine)
    parts: list[dict[Any, T] | None] = [None] * world.size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts if part for k, v in part.items()}


def summed(world: World, values: Sequence[float]) -> list[float]:
    """`values` summed over the ranks (float64)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class LossOf(torch.nn.Module):
    """A model's training loss as a module's forward: DDP and FSDP act around that call."""

    def __init__(self, model: torch.nn.Module, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None, compiled: bool) -> torch.Tensor:
        return self._loss(self.model, ids, labels=labels, compiled=compiled)


def wrap(world: World, model: torch.nn.Module, loss: Callable[..., torch.Tensor],
         blocks: list[torch.nn.Module], precision: str) -> torch.nn.Module:
    """The module a rank trains through: DDP around a whole replica, or FSDP2 sharding each
    decoder block and the rest (in place: `model`'s own parameters become shards)."""
    root = LossOf(model, loss)
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        # Gradients live in the buckets DDP all-reduces (no copy of every gradient into them: one
        # model's worth of memory and a pass over it less a step); no buffer changes in training.
        return DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None,
                                       forward_sync_buffers=False, gradient_as_bucket_view=True)
    if world.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if precision == "fp16":  # fp16 needs loss scaling across shards, not wired here
            raise ValueError("trainer.strategy fsdp computes in bf16 or fp32; training.precision fp16 (a GPU "
                             "without bf16) trains with strategy ddp")

        # bf16 compute over fp32 shards, gradients reduced in fp32: FSDP's own master weights.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(root, mp_policy=mp)
        return root
    raise ValueError(f"no strategy to wrap the model with: {world.strategy!r}")


def gradient_sync(module: torch.nn.Module, on: bool) -> Any:
    """A context in which backward does (or, inside an accumulation window, does not yet) reduce."""
    from contextlib import nullcontext

    if on:
        return nullcontext()
    no_sync = getattr(module, "no_sync", None)  # DDP
    if callable(no_sync):
        return no_sync()
    if callable(getattr(module, "set_requires_gradient_sync", None)):  # FSDP2
        return _Deferred(module)
    return nullcontext()


class _Deferred:
    """FSDP2's reduce-scatter held back for one backward (the micro-batches before a window's last)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc: object) -> None:
        self.module.set_requires_gradient_sync(True)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a sharded model, whole, on every rank (CPU tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def held_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (a shard's local part)."""
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(module.parameters())
    state = sum(local(v) for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"parameters": sum(local(p) for p in params),
            "gradients": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer": state}
