"""Timing and memory helpers shared by the benchmark scripts.

Every ``benchmarks/bench_*.py`` module exposes ``run(args) -> list[dict]``. Each row is one
(op, shape, provider) measurement with at least the keys ``op``, ``shape``, ``provider`` and
``ms`` (median, or ``None`` with a ``note`` when the provider cannot run here). Optional keys:
``gbps``, ``pct_copy_bw``, ``tflops``, ``peak_mb``, ``speedup``, ``note``, and any op-specific ones.

On CPU a time is the median of at least ``rep`` calls and of enough calls to fill
``CPU_MIN_SECONDS`` (a shared machine's load comes and goes: many short samples and their
median keep one slow moment from deciding a row).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

CPU_MIN_SECONDS = 0.3


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def cpu_description() -> str:
    """``"<model name>, <n> cores"`` from /proc/cpuinfo (Linux), for the results file."""
    model, cores = "unknown CPU", 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("processor"):
                    cores += 1
    except OSError:
        pass
    return f"{model}, {cores or '?'} cores"


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
    started = time.perf_counter()
    while len(times) < rep or (time.perf_counter() - started < CPU_MIN_SECONDS and len(times) < 50 * rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_of_runs(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    """(median wall ms, result of the median run) of ``runs`` calls of ``fn``: for end-to-end rows."""
    samples = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        result = fn()
        samples.append(((time.perf_counter() - start) * 1e3, result))
    samples.sort(key=lambda s: s[0])
    return samples[(len(samples) - 1) // 2]


class ForwardTimer:
    """Times every forward of ``module`` through hooks, so a pipeline's time splits into the
    model and the rest. CUDA: events (no host sync is added to the loop); CPU: ``perf_counter``.
    """

    def __init__(self, module: torch.nn.Module, device: str):
        self.device = device
        self._pending = None
        self._records: list = []
        self._handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, module, args):
        if self.device == "cuda":
            self._pending = torch.cuda.Event(enable_timing=True)
            self._pending.record()
        else:
            self._pending = time.perf_counter()

    def _after(self, module, args, output):
        if self.device == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._records.append((self._pending, end))
        else:
            self._records.append((time.perf_counter() - self._pending) * 1e3)

    def reset(self) -> None:
        self._records.clear()

    @property
    def calls(self) -> int:
        return len(self._records)

    def total_ms(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self._records)
        return sum(self._records)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


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


def ratio_summary(rows: list[dict]) -> list[str]:
    """One line per op: per shape, the fastest ddiff provider against the fastest other provider.

    ``speedup`` here is (best other ms) / (best ddiff ms): above 1, ddiff is faster. A shape with
    no pair to compare says what ran and which providers did not, with the reason each row gives.
    """
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        parts = []
        for shape in dict.fromkeys(r["shape"] for r in rows if r["op"] == op):
            here = [r for r in rows if r["op"] == op and r["shape"] == shape]
            timed = [r for r in here if r.get("ms")]
            ours = [r for r in timed if r["provider"].startswith("ddiff")]
            others = [r for r in timed if not r["provider"].startswith("ddiff")]
            if ours and others:
                best_ours = min(ours, key=lambda r: r["ms"])
                best_other = min(others, key=lambda r: r["ms"])
                ratio = best_other["ms"] / best_ours["ms"]
                parts.append(f"{shape}: {best_ours['provider']} {_fmt_ratio(ratio)} vs {best_other['provider']}")
                continue
            ran = ", ".join(f"{r['provider']} {r['ms']:.4g} ms" for r in timed) or "nothing ran"
            reasons: dict[str, list[str]] = {}
            for r in here:
                if not r.get("ms"):
                    reasons.setdefault(str(r.get("note") or "not run"), []).append(r["provider"])
            missing = "; ".join(f"{', '.join(dict.fromkeys(p))} not run: {why}" for why, p in reasons.items())
            if not (ours and others):
                missing = "; ".join(filter(None, [missing, "no " + ("other" if ours else "ddiff") + " provider ran"]))
            parts.append(f"{shape}: {ran} ({missing})")
        lines.append(f"{op}: " + "; ".join(parts))
    return lines


def _fmt_ratio(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "n/a"
    return f"{ratio:.2f}x"
