"""The CUDA extension's functions (`tests.test_kernels_cpu._FakeExt`: the kernels' own formulas in
torch) installed as this process's extension for CPU tensors, so the dispatch to the extension,
the kernels' self-check and the fused modules' substitution can be tested without a GPU.
`wrong=` makes one kernel's functions return numbers 2 % off and `raising=` makes them raise, as
a miscompiled or unsupported kernel would; `calls` counts each function's calls.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter

import torch

from shardformer.kernels import cuda

from .test_kernels_cpu import _FakeExt

calls: Counter = Counter()
KERNEL_OF = {"rmsnorm_fwd": "rmsnorm", "rmsnorm_bwd": "rmsnorm", "rotary": "rotary", "swiglu_fwd": "swiglu",
             "swiglu_bwd": "swiglu", "ce_chunk_stats": "cross_entropy", "ce_chunk_grad_": "cross_entropy",
             "addmm_fp32_": "cross_entropy", "linear_ce_forward": "cross_entropy"}


def _off(value):
    """`value` 2 % off (tensors in a tuple too)."""
    if isinstance(value, tuple):
        return tuple(_off(v) for v in value)
    return value * 1.02 if isinstance(value, torch.Tensor) and value.is_floating_point() else value


class StandIn:
    """The extension's functions; `wrong` / `raising`: a kernel name of `cuda.KERNELS`."""

    def __init__(self, wrong: str | None = None, raising: str | None = None):
        self.wrong, self.raising = wrong, raising

    def __getattr__(self, name):
        if name not in KERNEL_OF:
            raise AttributeError(name)
        kernel, fn = KERNEL_OF[name], getattr(_FakeExt, name)

        def call(*args):
            calls[name] += 1
            if kernel == self.raising:
                raise RuntimeError(f"no kernel image is available for execution on the device ({name})")
            out = fn(*args)
            if kernel == self.wrong:
                if name.endswith("_"):  # in place: the tensor it wrote
                    args[0].mul_(1.02)
                out = _off(out)
            return out
        return call


@contextlib.contextmanager
def installed(wrong: str | None = None, raising: str | None = None, cache_dir: str | None = None):
    """The stand-in as this process's extension (self-checked as the real one would be), the
    verdict cached under `cache_dir` (a fresh temporary directory by default); restored after."""
    old_dir = os.environ.get("SHARDFORMER_EXT_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SHARDFORMER_EXT_DIR"] = cache_dir or tmp
        try:
            cuda.install(StandIn(wrong, raising), f"stand-in(wrong={wrong}, raising={raising})", "cpu")
            yield
        finally:
            cuda.reset()
            if old_dir is None:
                os.environ.pop("SHARDFORMER_EXT_DIR", None)
            else:
                os.environ["SHARDFORMER_EXT_DIR"] = old_dir
