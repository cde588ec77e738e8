"""Timing and memory helpers shared by the benchmark scripts.

Every ``benchmarks/bench_*.py`` module exposes ``run(args) -> list[dict]``. Each row is one
(op, shape, provider) measurement with at least the keys ``op``, ``shape``, ``provider`` and
``ms`` (median, or ``None`` with a ``note`` when the provider cannot run here). Optional keys:
``gbps``, ``pct_copy_bw``, ``tflops``, ``peak_mb``, ``speedup``, ``note``, and any op-specific ones.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, rep: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA: triton's do_bench with its L2 flush)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory allocated during ``fn`` beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_COPY_BW_CACHE: dict[str, float] = {}


def copy_bandwidth_gbps(device: str) -> float | None:
    """Measured device-to-device copy bandwidth (read + write bytes / time), in GB/s."""
    if device != "cuda":
        return None
    if device not in _COPY_BW_CACHE:
        n = 1 << 28  # 512 MiB of bf16 -> 1 GiB moved per copy
        src = torch.empty(n, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device)
        _COPY_BW_CACHE[device] = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
        del src, dst
    return _COPY_BW_CACHE[device]


def provider_unavailable(op: str, shape: str, provider: str, why: str) -> dict:
    return {"op": op, "shape": shape, "provider": provider, "ms": None, "note": why}
