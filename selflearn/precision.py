"""Device and precision, decided once for the trainer and the serving engine.

`auto` means bf16 wherever the hardware runs it fast (a CUDA GPU that supports it, a CPU with
AVX512-BF16 or AMX), fp16 on older GPUs, fp32 otherwise.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    # AVX512-BF16 or AMX: bf16 matmuls ran ~4x faster than fp32 on such a CPU (see DESIGN.md);
    # without them torch emulates bf16 and fp32 is faster.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve(precision: str, device: torch.device, *, training: bool = True) -> str:
    """`auto` -> what this device runs fast; a named precision -> itself, if the device can use it.

    fp16 on a CPU is refused for training (no fp16 autocast or grad scaling there) and allowed for
    inference, where torch runs it, slowly."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16, fp16 or fp32")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "fp16" and training:
        raise ValueError("precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return precision


def dtype_of(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
