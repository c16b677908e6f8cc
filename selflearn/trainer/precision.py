"""Pick the training precision: `auto` means bf16 wherever the hardware runs it fast."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    # AVX512-BF16 or AMX: bf16 matmuls ran ~4x faster than fp32 on such a CPU (see DESIGN.md).
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16, fp16 or fp32")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "fp16":
        raise ValueError("precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return precision


def dtype_of(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
