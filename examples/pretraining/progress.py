"""What rank 0 of `examples/pretrain.py` shows and writes: a progress bar with loss, tokens/s,
TFLOP/s, MFU and peak memory; the same per step as one JSON line in `log.jsonl`; at the end the
loss curve as `loss.png` beside it.

Model FLOPs per token are 6 N + 12 L H S (examples/bench/flops.py states what N counts), so
TFLOP/s and MFU count the model's arithmetic, not recomputation. MFU divides by the world's
peak: --peak-tflops per device, by default 989 (H100 / H200 dense bf16) on CUDA and unknown
(shown as n/a) on CPU. Peak memory is this rank's peak CUDA allocation, or on CPU its peak
resident set (which includes the Python interpreter and libraries).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

GIB = 1024 ** 3


def peak_memory_gib() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


class Progress:
    """Per-step figures on rank 0 (`enabled`); other ranks keep nothing."""

    def __init__(self, enabled: bool, log_path: str, flops_per_token: float, peak_tflops: float | None,
                 world: int, start: int, total: int):
        self.enabled, self.log_path = enabled, log_path
        self.flops_per_token, self.world = flops_per_token, world
        self.peak = peak_tflops
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="pretrain", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)
        self.last = time.perf_counter()

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int) -> dict | None:
        """Record step `step` (1-based) that trained on `tokens` tokens over the world."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        if not self.enabled:
            return None
        tflops = self.flops_per_token * tokens / seconds / 1e12
        row = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6), "tokens": tokens,
               "step_time_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
               "tflops": round(tflops, 6), "mfu": None if self.peak is None else round(tflops / (self.peak * self.world), 6),
               "peak_memory_gib": round(peak_memory_gib(), 4)}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        self.bar.set_postfix_str(f"loss {loss:.3f} | {row['tokens_per_s']:,.0f} tok/s | {tflops:.3g} TFLOP/s | "
                                 f"MFU {mfu} | peak {row['peak_memory_gib']:.2f} GiB", refresh=False)
        self.bar.update(1)
        return row

    def restart_clock(self) -> None:
        """Start the next step's time now (after work that is not a step: a checkpoint)."""
        self.last = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(log_path: str, png_path: str) -> str:
    """The loss curve of `log_path` as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(log_path))) or "pretrain")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
