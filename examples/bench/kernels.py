"""Kernel micro-benchmarks, forward + backward: eager reference, its torch.compile, shardformer, Liger;
and SDPA's attention backends (shardformer ships no attention kernel; this shows which SDPA should use)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama import modeling_llama

from shardformer import kernels as sf_kernels
from shardformer.kernels import reference as sf_reference

from .common import error_record, liger_import_error
from .timing import free_memory, peak_over, start_peak, synchronize, time_op

HF_APPLY_ROTARY = modeling_llama.apply_rotary_pos_emb  # captured before anything rebinds it


_LIGER_KINDS = ("rmsnorm", "swiglu", "rotary", "linear_ce")  # the kinds _liger() knows


def _liger(kind: str):
    """Liger-Kernel's implementation of a kernel (a class or function), or None."""
    try:
        if kind == "rmsnorm":
            from liger_kernel.transformers import LigerRMSNorm
            return LigerRMSNorm
        if kind == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return LigerSiLUMulFunction.apply
        if kind == "rotary":
            from liger_kernel.transformers import liger_rotary_pos_emb
            return liger_rotary_pos_emb
        if kind == "linear_ce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            return LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001
        return None


def kernel_case(kind: str, shape, dtype, device) -> dict:
    """Inputs (leaves that take gradients), output gradients, the work done, and the implementations:
    name -> function of the inputs; "eager" is the reference that "compiled" compiles."""
    liger, esz = _liger(kind), torch.finfo(dtype).bits // 8

    def leaf(*size, scale=1.0):
        return (torch.randn(*size, device=device, dtype=dtype) * scale).requires_grad_()

    if kind == "rmsnorm":
        (rows, hidden), eps = shape, 1e-6
        ins = (leaf(rows, hidden), torch.nn.Parameter(torch.ones(hidden, device=device, dtype=dtype)))
        hf = modeling_llama.LlamaRMSNorm(hidden, eps=eps).to(device)
        hf.weight = ins[1]
        impls = {"eager": lambda x, w: hf(x), "shardformer": lambda x, w: sf_kernels.rms_norm(x, w, eps)}
        if liger:
            lmod = liger(hidden, eps=eps).to(device)
            lmod.weight = ins[1]
            impls["liger"] = lambda x, w: lmod(x)
        return dict(ins=ins, grads=torch.randn(rows, hidden, device=device, dtype=dtype), impls=impls,
                    # least traffic: x read, y written (forward); dy, x read, dx written (backward); w, dw
                    bytes=(5 * rows * hidden + 2 * hidden) * esz)
    if kind == "swiglu":
        rows, inter = shape
        impls = {"eager": sf_reference.swiglu, "shardformer": sf_kernels.swiglu}
        if liger:
            impls["liger"] = liger
        # least traffic: gate, up read, y written (forward); dy, gate, up read, dgate, dup written (backward)
        return dict(ins=(leaf(rows, inter), leaf(rows, inter)), impls=impls, bytes=8 * rows * inter * esz,
                    grads=torch.randn(rows, inter, device=device, dtype=dtype))
    if kind == "rotary":  # q/k are HF's [B, S, heads, D] projections viewed as [B, heads, S, D]
        b, hq, hkv, s, d = shape
        angle = torch.arange(s, device=device, dtype=torch.float32)[:, None] * torch.rand(d // 2, device=device)
        angle = torch.cat((angle, angle), dim=-1)[None]
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)

        def hf_layout(fn):
            return lambda q, k: tuple(fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin))

        impls = {"eager": hf_layout(HF_APPLY_ROTARY), "shardformer": hf_layout(sf_kernels.apply_rotary)}
        if liger:
            impls["liger"] = hf_layout(liger)
        grads = tuple(torch.randn(b, h, s, d, device=device, dtype=dtype) for h in (hq, hkv))
        return dict(ins=(leaf(b, s, hq, d), leaf(b, s, hkv, d)), grads=grads, impls=impls,
                    bytes=(4 * b * s * (hq + hkv) * d + 2 * s * d) * esz)
    if kind == "linear_ce":  # HF's loss upcasts the logits to fp32
        tokens, hidden, vocab = shape
        target = torch.randint(0, vocab, (tokens,), device=device)
        impls = {"eager": lambda h, w: F.cross_entropy(F.linear(h, w).float(), target),
                 "shardformer": lambda h, w: sf_kernels.linear_cross_entropy(h, w, target)}
        if liger:
            lce = liger()
            impls["liger"] = lambda h, w: lce(w, h, target)
        return dict(ins=(leaf(tokens, hidden), leaf(vocab, hidden, scale=0.02)), grads=None,  # d loss = 1
                    impls=impls, flops=6 * tokens * hidden * vocab)
    if kind == "attention":  # HF's SDPA call (GQA, causal) on each backend: which one SDPA should prefer
        b, hq, hkv, s, d = shape

        def sdpa(backend=None):
            def run(q, k, v):
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return run

        impls = {"eager": sdpa(), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
                 "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
        # FLOPs: causal forward 2*B*Hq*S^2*D (half of QK^T and PV), backward 2.5x forward
        return dict(ins=(leaf(b, hq, s, d), leaf(b, hkv, s, d), leaf(b, hkv, s, d)), impls=impls,
                    grads=torch.randn(b, hq, s, d, device=device, dtype=dtype), flops=3.5 * 2 * b * hq * s * s * d)
    raise ValueError(kind)


def time_kernel(fn, case: dict, device: str, ceilings: dict) -> dict:
    ins, grads = case["ins"], case["grads"]

    def fwd_bwd():
        out = fn(*ins)
        out = out if isinstance(out, tuple) else (out,)
        dout = tuple(map(torch.ones_like, out)) if grads is None else grads if isinstance(grads, tuple) else (grads,)
        return torch.autograd.grad(out, ins, dout)

    free_memory(device)
    fwd_bwd()  # first call (compilation, autotuning) outside the peak and the timing
    synchronize(device)
    base = start_peak(device)
    fwd_bwd()
    extra = peak_over(device, base)
    seconds = time_op(fwd_bwd, device)
    r = {"status": "ok", "ms": seconds * 1e3, "extra_peak_mem_gib": extra}
    if "bytes" in case:
        r["gb_per_s"] = case["bytes"] / seconds / 1e9
        r["vs_copy"] = r["gb_per_s"] / ceilings["copy"]["gb_per_s"] if ceilings.get("copy") else None
    else:
        r["tflops"] = case["flops"] / seconds / 1e12
        r["vs_matmul"] = r["tflops"] / ceilings["matmul"]["tflops"] if ceilings.get("matmul") else None
    return r


def run_kernel(kind: str, shape, args, ceilings: dict, result: dict | None, compiled: bool) -> dict:
    """Uncompiled implementations (compiled=False) or the compiled reference (True) into `result`."""
    device = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    result = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impls": {}} | (result or {})
    try:
        case = kernel_case(kind, shape, dtype, device)
    except Exception as exc:  # noqa: BLE001
        return result | error_record(exc)
    result |= {k: case[k] for k in ("bytes", "flops") if k in case}
    if compiled:
        torch._dynamo.reset()
        todo = {"compiled": torch.compile(case["impls"]["eager"])}
    else:
        result["shardformer_backend"] = ("cuda" if sf_kernels.available() else "pytorch reference "
                                         + ("(extension not loaded)" if device == "cuda" else "(CPU)"))
        todo = {k: v for k, v in case["impls"].items() if k != "liger" or device == "cuda"}
    for impl, fn in todo.items():
        try:
            result["impls"][impl] = time_kernel(fn, case, device, ceilings)
        except Exception as exc:  # noqa: BLE001
            result["impls"][impl] = error_record(exc)
    if not compiled and "liger" not in todo and kind in _LIGER_KINDS:
        result["impls"]["liger"] = {"status": "skipped", "reason": liger_import_error() or "Liger-Kernel needs CUDA"}
    del case, todo
    torch._dynamo.reset()
    free_memory(device)
    return result
