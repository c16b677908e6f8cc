"""Regional compilation for training: each repeated decoder block compiled once, shared by all.

The loop (loop.py) trains inside `compiled_blocks(...)` when `compile_wanted(...)` says a compiler
is there; a compile failure at any step makes the loop fall back to eager for the rest.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager, nullcontext

import torch

from . import attention as chunked_attention
from .loss import unwrap_peft


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated transformer blocks (HF names their class in `_no_split_modules`)."""
    names: set[str] = set()
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


def uncompile(blocks: list[torch.nn.Module]) -> None:
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
    # The implementation to put back on exit; None: attention is left as it is.
    swapped: str | None = attn if bool(blocks) and attn in ("sdpa", "eager") and device_type == "cpu" \
        and hasattr(inner, "set_attn_implementation") else None
    if swapped:
        inner.set_attn_implementation(chunked_attention.register())
    for b in blocks:
        _compile_block(b)
    try:
        with _isa_probes_skipped() if blocks and device_type == "cpu" else nullcontext():
            yield bool(blocks)
    finally:
        uncompile(blocks)
        if swapped:
            inner.set_attn_implementation(swapped)
