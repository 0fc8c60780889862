"""One extra, untimed training step under torch.profiler: which shardformer ops ran, and where the
GPU time of a step goes (by kind of kernel, and the heaviest kernels), so that a run that misses a
target also says what to work on next."""
from __future__ import annotations

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# first match wins; lower-case substrings of the demangled kernel name
KINDS = (("shardformer", ("sf::",)), ("attention", ("flash", "fmha", "attention", "cudnn")),
         ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "splitk")), ("optimizer", ("adam", "multi_tensor")),
         ("triton", ("triton",)), ("copy", ("memcpy", "memset", "copy_kernel")))
TOP = 15


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lower for k in keys)), "other")


def profile_step(step, device: str) -> dict:
    """Run `step()` once under the profiler. Keys: `shardformer_ops_per_step` (op -> calls), and on
    CUDA `gpu_ms_by_kind` (kind -> ms of kernel time, plus "total") and `gpu_top_kernels`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    ops: dict = {}
    kernels: dict = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            count, us = kernels.get(event.name, (0, 0.0))
            kernels[event.name] = (count + 1, us + event.time_range.elapsed_us())
        elif event.name.startswith("shardformer::"):
            ops[event.name] = ops.get(event.name, 0) + 1
    out: dict = {"shardformer_ops_per_step": dict(sorted(ops.items()))}
    if device == "cuda":
        by_kind: dict = {}
        for name, (_, us) in kernels.items():
            kind = kernel_kind(name)
            by_kind[kind] = by_kind.get(kind, 0.0) + us / 1e3
        by_kind["total"] = sum(by_kind.values())
        out["gpu_ms_by_kind"] = {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:TOP]
        out["gpu_top_kernels"] = [{"kind": kernel_kind(n), "calls": c, "ms": round(us / 1e3, 3), "name": n[:200]}
                                  for n, (c, us) in top]
    return out
