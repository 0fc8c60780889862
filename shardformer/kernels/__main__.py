"""`python -m shardformer.kernels`: what the fused kernels do on this machine.

Without a CUDA device: one line saying so (the PyTorch references run). With one: how the
extension came (ahead-of-time `shardformer._C`, built now by the JIT loader, or not at all and
why), each kernel's self-check verdict (run afresh, not read from the cache), and a quick
timing of each kernel against its PyTorch reference and against a device copy of the same bytes
(forward only, bf16, CUDA events, median of 20).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch


def _time_ms(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _timings():
    """(kernel, shape, fused ms, reference ms, copy ms) per kernel, bf16 on the current GPU."""
    from . import cuda, ops, reference
    from .cross_entropy import linear_cross_entropy

    dev, bf16 = "cuda", torch.bfloat16
    x, w = torch.randn(16384, 4096, device=dev, dtype=bf16), torch.ones(4096, device=dev, dtype=bf16)
    g, u = torch.randn(16384, 8192, device=dev, dtype=bf16), torch.randn(16384, 8192, device=dev, dtype=bf16)
    q, k = torch.randn(8, 32, 2048, 128, device=dev, dtype=bf16), torch.randn(8, 8, 2048, 128, device=dev, dtype=bf16)
    cos, sin = torch.randn(8, 2048, 128, device=dev, dtype=bf16), torch.randn(8, 2048, 128, device=dev, dtype=bf16)
    h, head = torch.randn(8192, 2048, device=dev, dtype=bf16), torch.randn(32000, 2048, device=dev, dtype=bf16) * 0.02
    target = torch.randint(0, 32000, (8192,), device=dev)
    cases = [
        ("rmsnorm", "[16384, 4096]", lambda: ops.rms_norm(x, w, 1e-6), lambda: reference.rms_norm(x, w, 1e-6), (x,)),
        ("swiglu", "[16384, 8192]", lambda: ops.swiglu(g, u), lambda: reference.swiglu(g, u), (g, u)),
        ("rotary", "q [8, 32, 2048, 128]", lambda: ops.apply_rotary(q, k, cos, sin),
         lambda: reference.apply_rotary(q, k, cos, sin), (q, k)),
        ("cross_entropy", "[8192, 2048] x vocab 32000",
         lambda: linear_cross_entropy(h, head, target, use_cuda=cuda.enabled("cross_entropy")),
         lambda: torch.nn.functional.cross_entropy((h @ head.t()).float(), target), (h,)),
    ]
    rows = []
    with torch.no_grad():
        for name, shape, fused, ref, read in cases:
            copies = [t.clone() for t in read]
            rows.append((name, shape, _time_ms(fused), _time_ms(ref),
                         _time_ms(lambda: [c.copy_(t) for c, t in zip(copies, read)])))
    return rows


def main() -> int:
    from . import cuda, selfcheck

    if not torch.cuda.is_available():
        print(f"shardformer kernels: no CUDA device (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): the extension is not built, the PyTorch references run")
        return 0
    began = time.perf_counter()
    ext = cuda.load()
    gpu = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
    if ext is None:
        print(f"shardformer kernels on {gpu}: extension not available ({cuda._state['why']}); the PyTorch "
              "references run")
        return 1
    origin = {"aot": "ahead of time (shardformer._C)", "jit": "JIT-built"}.get(cuda._state["origin"],
                                                                              cuda._state["origin"])
    print(f"shardformer kernels on {gpu}: extension {origin}, loaded in {time.perf_counter() - began:.1f} s; "
          f"SHARDFORMER_KERNELS={cuda.mode()}")
    began = time.perf_counter()
    applied, cuda._state["disabled"] = cuda._state["disabled"], {}  # check and time every kernel afresh
    try:
        verdict = selfcheck.run("cuda")
        timings = _timings()
    finally:
        cuda._state["disabled"] = applied
    print(f"self-check ({time.perf_counter() - began:.2f} s; cached verdict {selfcheck.cache_path('cuda')}):")
    for kernel, reason in verdict.items():
        print(f"  {kernel:<14} {'pass' if reason is None else 'FAIL: ' + reason}")
    print(f"{'kernel':<14} {'shape (bf16)':<28} {'fused ms':>9} {'reference ms':>13} {'copy ms':>8}"
          f"{'   (kernels the check failed are timed anyway)' if any(verdict.values()) else ''}")
    for name, shape, fused, ref, copy in timings:
        print(f"{name:<14} {shape:<28} {fused:>9.3f} {ref:>13.3f} {copy:>8.3f}")
    return 0 if all(reason is None for reason in verdict.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
