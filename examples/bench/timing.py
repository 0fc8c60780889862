"""Timing (CUDA events on CUDA, perf_counter on CPU), memory counters, and the ceilings measured in
this run: the achievable matmul rate and the device-to-device copy bandwidth."""
from __future__ import annotations

import gc
import time

import torch

from .common import GIB


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def start_peak(device: str) -> int:
    """Reset the peak counter; return what is allocated now (the baseline the peak is taken over)."""
    if device != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_over(device: str, base: int) -> float | None:
    return (torch.cuda.max_memory_allocated() - base) / GIB if device == "cuda" else None


def time_calls(fn, n: int, device: str) -> list[float]:
    """Seconds of each of `n` calls: CUDA events between calls (one sync at the end), else perf_counter."""
    if device == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        marks[0].record()
        for i in range(n):
            fn()
            marks[i + 1].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    out, last = [], time.perf_counter()
    for _ in range(n):
        fn()
        now = time.perf_counter()
        out.append(now - last)
        last = now
    return out


def time_op(fn, device: str, warmup: int = 3, reps: int = 3, target_s: float = 0.1) -> float:
    """Median over `reps` of the mean seconds per call; calls per rep sized to take about `target_s`."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    iters = max(3, min(50, int(target_s / max(time_calls(fn, 1, device)[0], 1e-6))))
    per_call = sorted(sum(time_calls(fn, iters, device)) / iters for _ in range(reps))
    return per_call[len(per_call) // 2]


def measure_matmul(device: str, n: int, dtype: torch.dtype) -> dict:
    """Achievable dense matmul rate: C = A @ B, n x n x n, 2 n^3 FLOPs per call."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    seconds = time_op(lambda: torch.matmul(a, b, out=c), device, target_s=0.2)
    return {"size": n, "dtype": str(dtype).replace("torch.", ""), "seconds": seconds,
            "tflops": 2 * n ** 3 / seconds / 1e12}


def measure_copy(device: str, gib: float) -> dict:
    """Device-to-device copy bandwidth: dst.copy_(src), bytes = 2 x buffer (read + write)."""
    src = torch.randn(int(gib * GIB) // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = time_op(lambda: dst.copy_(src), device, target_s=0.1)
    nbytes = 2 * src.numel() * src.element_size()
    return {"buffer_gib": nbytes / 2 / GIB, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}
