"""Shared helpers for the benchmarks: the 64-article setup and a measured matmul peak."""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def snapshot_articles(n: int, offset: int = 0):
    from selflearn.sources.pipeline import clean_articles
    from selflearn.sources.snapshot import SnapshotSource

    arts, _ = SnapshotSource("en").fetch(n + offset + 16, {})
    return clean_articles(arts[offset:], min_chars=200).kept[:n]


def matmul_peak_gflops(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9
