"""Model variants: build the model, apply the variant (Liger, shardformer, torch.compile), train and time it."""
from __future__ import annotations

import contextlib
import socket
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

import shardformer as sf
from shardformer import kernels as sf_kernels
from shardformer.kernels import ops as sf_ops

from .common import COMPILED, GIB, error_record, liger_import_error, log
from .profile import profile_step
from .timing import allocated, free_memory, peak_over, start_peak, synchronize, time_calls


def skip_reason(name: str, args) -> str | None:
    if name == "hf_liger":
        return liger_import_error() or (None if args.device == "cuda" else "Liger-Kernel's Triton kernels need CUDA")
    return None


def ensure_process_group(device: str) -> str:
    """A world of 1 unless one exists; its backend. gloo, also on CUDA: with tp = dp = 1 shardformer
    runs no collective, so the backend costs nothing in the timed steps, and gloo cannot hang the
    lease in an NCCL start-up the way a sandboxed GPU machine might (nccl only if gloo fails)."""
    for backend in ("gloo", "nccl") if device == "cuda" else ("gloo",):
        if dist.is_initialized():
            break
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log(f"init_process_group({backend!r}) failed ({type(exc).__name__}: {exc}); trying the next backend")
            if dist.is_initialized():
                dist.destroy_process_group()
    return dist.get_backend()


class ModelingPatchGuard:
    """Restores modeling_llama's module globals and class attributes that a patcher (Liger,
    shardformer's rotary switch) rebinds, so that later variants run unpatched HF code."""

    def __init__(self):
        self.globals = dict(vars(modeling_llama))
        self.classes = {name: dict(vars(obj)) for name, obj in self.globals.items()
                        if isinstance(obj, type) and obj.__module__ == modeling_llama.__name__}

    def restore(self):
        for name, value in self.globals.items():
            if getattr(modeling_llama, name, None) is not value:
                setattr(modeling_llama, name, value)
        for name, saved in self.classes.items():
            for attr, value in saved.items():
                if attr not in ("__dict__", "__weakref__") and vars(self.globals[name]).get(attr) is not value:
                    setattr(self.globals[name], attr, value)


def build_model(config: LlamaConfig, device: str, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"expected attn_implementation 'sdpa', got {model.config._attn_implementation!r}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"expected fp32 weights, got {dtypes}")
    return model.train()


def prepare(name: str, model: torch.nn.Module, args, info: dict):
    """Apply the variant's transformation; return (model, the callable that runs it)."""
    if name == "hf_liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(model=model)  # rope, rms_norm, swiglu, fused linear cross-entropy
    if name.startswith("sf_"):
        sf_ops.COMPILED_KERNELS = "custom" if name.endswith("_custom") else "inductor"
        info["compiled_kernels"] = sf_ops.COMPILED_KERNELS if name in COMPILED else None
        info["process_group_backend"] = ensure_process_group(args.device)
        model = sf.shard_model(model, config=sf.ShardConfig(tp_size=1, enable_fused_kernels=True))
        info["fused_modules"] = {
            "FusedRMSNorm": sum(isinstance(m, sf_kernels.FusedRMSNorm) for m in model.modules()),
            "FusedSwiGLUMLP": sum(isinstance(m, sf_kernels.FusedSwiGLUMLP) for m in model.modules()),
            "fused_rotary_installed": modeling_llama.apply_rotary_pos_emb.__module__.startswith("shardformer"),
        }
    if name in COMPILED:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        return model, torch.compile(model, **({"mode": args.compile_mode} if args.compile_mode else {}))
    return model, model


def train_step(runner, opt, ids, autocast, compiled: bool) -> torch.Tensor:
    if compiled:  # needed by the CUDA-graph modes (--compile-mode reduce-overhead); a no-op otherwise
        torch.compiler.cudagraph_mark_step_begin()
    with autocast():
        loss = runner(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().clone()


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters.get("stats", {}).get("unique_graphs", 0))


def graph_break_stats() -> dict:
    breaks = torch._dynamo.utils.counters.get("graph_break", {})
    top = sorted(breaks.items(), key=lambda kv: -kv[1])[:5]
    return {"graph_breaks": int(sum(breaks.values())), "unique_graphs": unique_graphs(),
            "graph_break_reasons": [{"count": c, "reason": str(r)[:300]} for r, c in top]}


def run_variant(name: str, args, config: LlamaConfig, ids: torch.Tensor, flops: dict) -> dict:
    device, compiled = args.device, name in COMPILED
    reason = skip_reason(name, args)
    if reason:
        return {"status": "skipped", "reason": reason}
    info: dict = {"status": "ok"}
    if name.startswith("sf_"):  # build / load the extension outside every timed region (it may be building)
        t0 = time.perf_counter()
        info["cuda_extension_loaded"] = sf_kernels.available()
        info["cuda_extension_wait_s"] = time.perf_counter() - t0
    guard = ModelingPatchGuard()
    free_memory(device)
    base = start_peak(device)
    started = time.perf_counter()
    model = runner = opt = None
    try:
        model = build_model(config, device, args.seed)
        model, runner = prepare(name, model, args, info)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=(device == "cuda"))
        autocast = (contextlib.nullcontext if args.dtype == "fp32"
                    else lambda: torch.autocast(device, dtype=torch.bfloat16))

        def step():
            return train_step(runner, opt, ids, autocast, compiled)

        losses = [step() for _ in range(args.warmup)]
        synchronize(device)
        info["warmup_s"] = time.perf_counter() - started
        graphs = unique_graphs()
        steps_s = time_calls(lambda: losses.append(step()), args.steps, device)
        info["peak_mem_gib"] = peak_over(device, base)
        info["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB if device == "cuda" else None
        info["mem_before_gib"] = base / GIB
        total = sum(steps_s)
        info |= {"step_s_mean": total / args.steps, "step_s_median": sorted(steps_s)[args.steps // 2],
                 "step_s_min": min(steps_s), "step_s_max": max(steps_s),
                 "tokens_per_s": ids.numel() * args.steps / total,
                 "model_tflops": ids.numel() * args.steps / total * flops["flops_per_token"] / 1e12,
                 "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
        if compiled:
            info |= graph_break_stats()
            info["recompiled_while_timed"] = unique_graphs() != graphs
        if name.startswith("sf_") or device == "cuda":
            try:
                info |= profile_step(step, device)
            except Exception as exc:  # noqa: BLE001 - the timing stands without the profile
                info["profile_error"] = f"{type(exc).__name__}: {exc}"[:500]
    except Exception as exc:  # noqa: BLE001 - record and go on to the next variant
        info |= error_record(exc) | {"peak_mem_gib": peak_over(device, base)}
        if compiled:
            info |= graph_break_stats()
    finally:
        model = runner = opt = step = None  # drop every reference before measuring what is left
        if name.startswith("sf_"):
            sf_kernels.disable_fused_rotary()
            sf_ops.COMPILED_KERNELS = "inductor"
        guard.restore()
        torch._dynamo.reset()
        free_memory(device)
    info["mem_left_after_gib"] = (allocated(device) - base) / GIB if device == "cuda" else None  # a leak if > 0
    info["wall_s"] = time.perf_counter() - started
    return info
