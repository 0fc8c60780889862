"""Constants shared by the benchmark's modules, logging, SIGTERM handling, error records."""
from __future__ import annotations

import os
import signal
import traceback

PEAK_TFLOPS_BF16 = 989.0  # H100 / H200 SXM dense bf16, the MFU denominator DESIGN.md fixes
VARIANTS = ("hf_eager", "hf_compile", "hf_liger", "sf_fused", "sf_fused_compile", "sf_fused_compile_custom")
PEERS = ("hf_compile", "hf_liger")
COMPILED = ("hf_compile", "sf_fused_compile", "sf_fused_compile_custom")
KERNELS = ("rmsnorm", "swiglu", "rotary", "linear_ce", "attention")
NOT_COMPILED = ("attention",)  # torch.compile of SDPA runs the same kernel: no compiled reference
EST_S = {"variant": 25, "compiled": 90, "kernel": 10, "kernel_compiled": 20}  # for --time-budget
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/bench/ -> root
GIB = 1024 ** 3

LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batch=8, seq=2048)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=250, batch=2, seq=64)
# rmsnorm (rows, hidden), swiglu (rows, inter), rotary and attention (B, Hq, Hkv, S, D), linear_ce (tokens, hidden, vocab)
KERNEL_SHAPES = dict(rmsnorm=(32768, 4096), swiglu=(16384, 8192), rotary=(8, 32, 8, 2048, 64),
                     linear_ce=(16384, 2048, 128256), attention=(8, 32, 8, 2048, 64))
TINY_KERNEL_SHAPES = dict(rmsnorm=(1024, 256), swiglu=(1024, 256), rotary=(2, 4, 2, 64, 16), linear_ce=(256, 64, 1000),
                          attention=(2, 4, 2, 64, 16))


def log(msg: str = "") -> None:
    print(msg, flush=True)


class Interrupted(BaseException):
    """SIGTERM arrived (a BaseException, so no stage's `except Exception` swallows it)."""


def on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; the report is written next
    raise Interrupted("SIGTERM")


def error_record(exc: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:]}


def liger_import_error() -> str | None:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        del apply_liger_kernel_to_llama  # imported only to see that it imports
        return None
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"liger_kernel does not import ({type(exc).__name__}: {exc})"
