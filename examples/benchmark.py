"""Single-GPU training benchmark: HF eager, HF + torch.compile, HF + Liger-Kernel and shardformer's
fused kernels, side by side in one process, on the same model and the same batch.

Full run (one H200 / H100; writes benchmarks/results/<gpu-name>-<YYYY-MM-DD>.json):

    python examples/benchmark.py

CPU smoke test (tiny model, fp32, no kernel micro-benchmarks; writes to the temp directory):

    python examples/benchmark.py --tiny --device cpu --dtype fp32 --steps 2 --warmup 1

``--out PATH`` writes the JSON elsewhere; ``--only`` / ``--kernels`` pick a subset (``--help``).

What is measured
----------------
Model variants (each a fresh model with the same seed, so the same initial weights):

    hf_eager          transformers, attn_implementation="sdpa"
    hf_compile        the same model wrapped in torch.compile
    hf_liger          Liger-Kernel's apply_liger_kernel_to_llama(model=...) (only if it imports)
    sf_fused          sf.shard_model(model, ShardConfig(tp_size=1, enable_fused_kernels=True))
    sf_fused_compile  the shardformer model wrapped in torch.compile

Default model: Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate
8192, vocab 128256, tied embeddings), random init from a LlamaConfig (nothing is downloaded), batch
8 x 2048, fp32 weights under bf16 autocast, fused AdamW. One training step is: forward with labels,
backward, optimizer step, zero_grad. ``--warmup`` steps are run first (they include compilation),
then ``--steps`` steps are timed with CUDA events.

Per variant: tokens/s, model TFLOP/s, MFU against 989 TFLOP/s (H100/H200 dense bf16) and against
the bf16 matmul rate measured in this run, peak memory (torch.cuda.max_memory_allocated, reset
before each variant, model and optimizer included), the ratio to the best peer (peers: hf_compile
and hf_liger; tokens/s against the fastest peer, memory against the peer with the lowest peak),
the loss of the first and last step (a cross-check that every variant trains the same model),
graph breaks of the compiled variants, and for shardformer which of its CUDA ops actually ran.

FLOPs per token (DESIGN.md): 6 * N + 12 * L * H * S, where N counts the parameters that take part
in matmuls: every parameter except the input embedding. With tied embeddings the LM head weight IS
the embedding matrix; we count it once, as the LM head (its matmul is done; the embedding lookup is
not), so N = the number of unique parameters. Without tying, N = all parameters minus the input
embedding. L layers, H hidden size, S sequence length, attention counted full (not causal).

Kernel micro-benchmarks (CUDA only), forward + backward, achieved GB/s against a device-to-device
copy (``dst.copy_(src)``, bytes = 2 * buffer size) measured in this run. Byte convention: every
logical tensor of the forward + backward is counted once, read or written:
    RMSNorm  [rows, hidden]   reads x, weight, dy; writes y, dx, dweight
    SwiGLU   [rows, inter]    reads gate, up, dy;  writes y, dgate, dup
    rotary   q [B, Hq, S, D], k [B, Hkv, S, D] (HF's layout: views of [B, S, heads, D]), cos/sin [1, S, D]
                              reads q, k, cos, sin, dq_out, dk_out; writes q_out, k_out, dq, dk
Re-reads (e.g. x again in the backward) are not counted, so a kernel that must read x twice cannot
reach the copy rate under this convention.

Every variant and every kernel implementation runs inside try/except: a failure (OOM, a compile
error, a missing package) is recorded with its error text and the run continues. The JSON file is
rewritten after every stage, so an interrupted run still leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import shardformer as sf
from shardformer import kernels as sf_kernels
from shardformer.kernels import reference as sf_reference

PEAK_TFLOPS_BF16 = 989.0  # H100 / H200 SXM dense bf16, the MFU denominator DESIGN.md fixes
VARIANTS = ("hf_eager", "hf_compile", "hf_liger", "sf_fused", "sf_fused_compile")
PEERS = ("hf_compile", "hf_liger")
COMPILED = ("hf_compile", "sf_fused_compile")
KERNELS = ("rmsnorm", "swiglu", "rotary")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3

LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                batch=8, seq=2048)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=250, batch=2, seq=64)
# kernel shapes: (RMSNorm rows, hidden), SwiGLU (rows, intermediate), rotary (B, Hq, Hkv, S, D)
KERNEL_SHAPES = dict(rmsnorm=(32768, 4096), swiglu=(16384, 8192), rotary=(8, 32, 8, 2048, 64))
TINY_KERNEL_SHAPES = dict(rmsnorm=(1024, 256), swiglu=(1024, 256), rotary=(2, 4, 2, 64, 16))


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ============================================================================ command line
def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {', '.join(allowed)} (comma separated) or none")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="autocast dtype over fp32 weights (fp32 = no autocast); default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tiny", action="store_true",
                   help="tiny model (hidden 64, 2 layers, vocab 250, batch 2 x 64) and tiny kernel shapes")
    for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "batch", "seq"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {LLAMA_1B[name]} ({TINY[name]} with --tiny)")
    p.add_argument("--untied", action="store_true", help="separate LM head (default: tied embeddings)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}, or none")
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help=f"kernel micro-benchmarks to run (CUDA only): subset of {', '.join(KERNELS)}, or none")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="square matmul used to measure the achievable rate (default 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--copy-gib", type=float, default=1.0, help="buffer size of the device-copy bandwidth test")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/<gpu>-<date>.json on CUDA, the temp dir on CPU)")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    preset = TINY if args.tiny else LLAMA_1B
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.variants = _names(args.only, VARIANTS, "--only")
    args.kernel_list = _names(args.kernels, KERNELS, "--kernels")
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device == "cuda" else 1024
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    return args


def model_config(args) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=not args.untied,
        rope_theta=500000.0, attn_implementation="sdpa", use_cache=False,
    )


# ============================================================================ environment, output
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:  # noqa: BLE001 - a copy without .git, no git binary: just unknown
        return None


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return None


def environment(args) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "liger_kernel": _liger_version(),
        "shardformer": getattr(sf, "__version__", None),
        "shardformer_commit": _git_commit(),
    }
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        env["gpu_sm_count"] = props.multi_processor_count
    return env


def default_out_path(env: dict) -> str:
    if env["device"] == "cuda":
        return os.path.join(REPO_ROOT, "benchmarks", "results", f"{_slug(env['gpu'])}-{env['date']}.json")
    return os.path.join(tempfile.gettempdir(), f"shardformer-benchmark-cpu-{env['date']}.json")


def save(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def error_record(exc: BaseException) -> dict:
    text = f"{type(exc).__name__}: {exc}"
    return {"status": "failed", "error": text[:2000], "traceback": traceback.format_exc()[-4000:]}


# ============================================================================ timing, memory
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    free_memory(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> dict:
    if device != "cuda":
        return {"peak_mem_gib": None, "peak_reserved_gib": None}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


class StepTimer:
    """Per-step wall time: CUDA events on the GPU (no sync inside the timed loop), perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_s(self) -> list[float]:
        """Seconds between consecutive marks (synchronizes first)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def time_op(fn, device: str, warmup: int = 3, iters: int = 20, reps: int = 3) -> float:
    """Median over `reps` of the mean seconds per call of `fn` over `iters` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_call = []
    for _ in range(reps):
        timer = StepTimer(device)
        timer.mark()
        for _ in range(iters):
            fn()
        timer.mark()
        per_call.append(timer.intervals_s()[0] / iters)
    return sorted(per_call)[len(per_call) // 2]


# ============================================================================ FLOPs, reference rates
def count_flops(config: LlamaConfig, seq: int) -> dict:
    """FLOPs per token = 6 N + 12 L H S (see the module docstring for what N counts)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    unique = {id(p): p.numel() for p in model.parameters()}  # tied weights counted once
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    n = sum(unique.values()) - (0 if tied else embedding.numel())
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq
    return {"params_total_unique": sum(unique.values()), "params_N": n, "tied_embeddings": tied,
            "flops_per_token": 6 * n + attention, "flops_per_token_attention": attention,
            "convention": "6*N + 12*L*H*S; N = all unique parameters except the input embedding "
                          "(tied: the shared matrix is counted once, as the LM head); full attention"}


def measure_matmul(device: str, n: int, dtype: torch.dtype) -> dict:
    """Achievable dense matmul rate: C = A @ B, n x n x n, 2 n^3 FLOPs per call."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    iters = 20 if device == "cuda" else 3
    seconds = time_op(lambda: torch.matmul(a, b, out=c), device, warmup=3, iters=iters)
    del a, b, c
    free_memory(device)
    return {"size": n, "dtype": str(dtype).replace("torch.", ""), "seconds": seconds,
            "tflops": 2 * n ** 3 / seconds / 1e12}


def measure_copy(device: str, gib: float) -> dict:
    """Device-to-device copy bandwidth: dst.copy_(src), bytes = 2 x buffer (read + write)."""
    n = int(gib * GIB) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = time_op(lambda: dst.copy_(src), device, warmup=3, iters=20)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    free_memory(device)
    return {"buffer_gib": n * 2 / GIB, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}


# ============================================================================ model variants
def liger_import_error() -> str | None:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"liger_kernel does not import ({type(exc).__name__}: {exc})"


def _liger_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("liger-kernel")
    except Exception:  # noqa: BLE001
        return None


def skip_reason(name: str, args) -> str | None:
    if name == "hf_liger":
        reason = liger_import_error()
        if reason:
            return reason
        if args.device != "cuda":
            return "Liger-Kernel runs Triton kernels and needs CUDA"
    return None


def ensure_process_group(device: str) -> bool:
    """Initialise a world of 1 (nccl on CUDA, gloo on CPU) unless one exists; True if created here."""
    if dist.is_initialized():
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if device == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    return True


class ModelingPatchGuard:
    """Restores transformers' modeling_llama module globals and class attributes that a patcher
    (Liger, shardformer's rotary switch) rebinds, so later variants see unpatched HF code."""

    def __init__(self):
        from transformers.models.llama import modeling_llama
        self.module = modeling_llama
        self.globals = dict(vars(modeling_llama))
        self.classes = {name: dict(vars(obj)) for name, obj in self.globals.items()
                        if isinstance(obj, type) and obj.__module__ == modeling_llama.__name__}

    def restore(self):
        for name, value in self.globals.items():
            if getattr(self.module, name, None) is not value:
                setattr(self.module, name, value)
        for name, saved in self.classes.items():
            cls = self.globals[name]
            for attr, value in saved.items():
                if vars(cls).get(attr) is not value and attr not in ("__dict__", "__weakref__"):
                    setattr(cls, attr, value)


def build_model(config: LlamaConfig, device: str, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"expected attn_implementation 'sdpa', got {model.config._attn_implementation!r}")
    return model.train()


def prepare(name: str, model: torch.nn.Module, args, info: dict) -> torch.nn.Module:
    """Apply the variant's transformation; return the callable model (maybe a compiled wrapper)."""
    if name == "hf_liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(model=model)  # rope, rms_norm, swiglu, fused linear cross-entropy
    if name.startswith("sf_"):
        info["process_group_created"] = ensure_process_group(args.device)
        model = sf.shard_model(model, config=sf.ShardConfig(tp_size=1, enable_fused_kernels=True))
        from transformers.models.llama import modeling_llama
        info["fused_modules"] = {
            "FusedRMSNorm": sum(isinstance(m, sf_kernels.FusedRMSNorm) for m in model.modules()),
            "FusedSwiGLUMLP": sum(isinstance(m, sf_kernels.FusedSwiGLUMLP) for m in model.modules()),
            "fused_rotary_installed": getattr(modeling_llama.apply_rotary_pos_emb, "__module__", "")
            .startswith("shardformer"),
        }
        info["cuda_extension_loaded"] = sf_kernels.available()
    if name in COMPILED:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
        model = torch.compile(model, **kwargs)
    return model


def train_step(model, opt, ids, autocast) -> torch.Tensor:
    with autocast():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def fused_ops_seen(model, opt, ids, autocast) -> dict:
    """One extra (untimed) step under the profiler: how often each shardformer:: op ran per step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, opt, ids, autocast)
    counts = {}
    for event in prof.events():
        if event.name.startswith("shardformer::"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return dict(sorted(counts.items()))


def graph_break_stats() -> dict:
    counters = torch._dynamo.utils.counters
    breaks = counters.get("graph_break", {})
    reasons = sorted(breaks.items(), key=lambda kv: -kv[1])[:5]
    return {"graph_breaks": int(sum(breaks.values())),
            "unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
            "graph_break_reasons": [{"count": c, "reason": str(r)[:300]} for r, c in reasons]}


def run_variant(name: str, args, config: LlamaConfig, ids: torch.Tensor, flops: dict) -> dict:
    device = args.device
    reason = skip_reason(name, args)
    if reason:
        return {"status": "skipped", "reason": reason, "wall_s": 0.0}
    info: dict = {"status": "ok"}
    guard = ModelingPatchGuard()
    reset_peak(device)
    started = time.perf_counter()
    model = runner = opt = None
    try:
        model = build_model(config, device, args.seed)
        runner = prepare(name, model, args, info)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=(device == "cuda"))
        autocast = autocast_factory(args)
        losses = []
        for _ in range(args.warmup):
            losses.append(train_step(runner, opt, ids, autocast))
        synchronize(device)
        info["warmup_s"] = time.perf_counter() - started
        timer = StepTimer(device)
        timer.mark()
        for _ in range(args.steps):
            losses.append(train_step(runner, opt, ids, autocast))
            timer.mark()
        steps_s = timer.intervals_s()
        info.update(peak_gib(device))
        total = sum(steps_s)
        tokens = ids.numel() * args.steps
        info.update({
            "step_s_mean": total / args.steps,
            "step_s_median": sorted(steps_s)[len(steps_s) // 2],
            "tokens_per_s": tokens / total,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        })
        tflops = info["tokens_per_s"] * flops["flops_per_token"] / 1e12
        info["model_tflops"] = tflops
        if name in COMPILED:
            info.update(graph_break_stats())
        if name.startswith("sf_"):
            info["shardformer_ops_per_step"] = fused_ops_seen(runner, opt, ids, autocast)
    except Exception as exc:  # noqa: BLE001 - record and go on to the next variant
        info = {**info, **error_record(exc), **peak_gib(device)}
        if name in COMPILED:
            info.update(graph_break_stats())
    finally:
        del model, runner, opt
        if name.startswith("sf_"):
            sf_kernels.disable_fused_rotary()
        guard.restore()
        torch._dynamo.reset()
        free_memory(device)
    info["wall_s"] = time.perf_counter() - started
    return info


def autocast_factory(args):
    if args.dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(args.device, dtype=torch.bfloat16)


def add_ratios(variants: dict, matmul: dict | None) -> None:
    """MFU against 989 and the measured matmul rate; ratios to the best peer."""
    ok = {n: v for n, v in variants.items() if v.get("status") == "ok"}
    for v in ok.values():
        v["mfu_vs_989"] = v["model_tflops"] / PEAK_TFLOPS_BF16
        v["mfu_vs_measured_matmul"] = v["model_tflops"] / matmul["tflops"] if matmul else None
    peers = {n: ok[n] for n in PEERS if n in ok}
    fastest = max(peers, key=lambda n: peers[n]["tokens_per_s"]) if peers else None
    with_mem = {n: p for n, p in peers.items() if p.get("peak_mem_gib")}
    leanest = min(with_mem, key=lambda n: with_mem[n]["peak_mem_gib"]) if with_mem else None
    for v in ok.values():
        v["best_peer_tokens"] = fastest
        v["tokens_vs_best_peer"] = v["tokens_per_s"] / peers[fastest]["tokens_per_s"] if fastest else None
        v["best_peer_mem"] = leanest
        v["peak_mem_vs_best_peer"] = (v["peak_mem_gib"] / with_mem[leanest]["peak_mem_gib"]
                                      if leanest and v.get("peak_mem_gib") else None)


# ============================================================================ kernel micro-benchmarks
def _grad_fn(forward, inputs, grads_out):
    """Forward + backward of `forward()` w.r.t. `inputs`, seeded with `grads_out` (no accumulation)."""
    def fn():
        out = forward()
        out = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(out, inputs, grads_out)
    return fn


def _liger_impl(kind: str):
    """Liger-Kernel's version of a kernel, or None when it does not import / has no such op."""
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
    except Exception:  # noqa: BLE001
        return None
    return None


def rmsnorm_cases(shape, dtype, device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    rows, hidden = shape
    eps = 1e-6
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    hf = LlamaRMSNorm(hidden, eps=eps).to(device=device, dtype=dtype)
    compiled = torch.compile(LlamaRMSNorm(hidden, eps=eps).to(device=device, dtype=dtype))
    weight = torch.nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
    esz = x.element_size()
    nbytes = 4 * x.numel() * esz + 2 * hidden * esz  # x, dy in; y, dx out; weight in, dweight out
    cases = {
        "hf_eager": _grad_fn(lambda: hf(x), (x, hf.weight), dy),
        "hf_compile": _grad_fn(lambda: compiled(x), (x, compiled.weight), dy),
        "shardformer": _grad_fn(lambda: sf_kernels.rms_norm(x, weight, eps), (x, weight), dy),
    }
    liger = _liger_impl("rmsnorm")
    if liger is not None:
        lmod = liger(hidden, eps=eps).to(device=device, dtype=dtype)
        cases["liger"] = _grad_fn(lambda: lmod(x), (x, lmod.weight), dy)
    return cases, nbytes


def swiglu_cases(shape, dtype, device):
    rows, inter = shape
    gate = torch.randn(rows, inter, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    dy = torch.randn_like(gate)
    compiled = torch.compile(sf_reference.swiglu)
    nbytes = 6 * gate.numel() * gate.element_size()  # gate, up, dy in; y, dgate, dup out
    ins = (gate, up)
    cases = {
        "eager_reference": _grad_fn(lambda: sf_reference.swiglu(gate, up), ins, dy),
        "compiled_reference": _grad_fn(lambda: compiled(gate, up), ins, dy),
        "shardformer": _grad_fn(lambda: sf_kernels.swiglu(gate, up), ins, dy),
    }
    liger = _liger_impl("swiglu")
    if liger is not None:
        cases["liger"] = _grad_fn(lambda: liger(gate, up), ins, dy)
    return cases, nbytes


def rotary_cases(shape, dtype, device):
    b, hq, hkv, s, d = shape
    # HF's layout: q/k are [B, S, heads, D] projections viewed as [B, heads, S, D]
    qb = torch.randn(b, s, hq, d, device=device, dtype=dtype, requires_grad=True)
    kb = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
    angle = torch.arange(s, device=device, dtype=torch.float32)[:, None] * torch.rand(d // 2, device=device)
    angle = torch.cat((angle, angle), dim=-1)[None]
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    dq = torch.randn(b, hq, s, d, device=device, dtype=dtype)
    dk = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    compiled = torch.compile(sf_reference.apply_rotary)
    esz = qb.element_size()
    nbytes = 4 * (qb.numel() + kb.numel()) * esz + 2 * cos.numel() * esz

    def call(fn):
        return lambda: tuple(fn(qb.transpose(1, 2), kb.transpose(1, 2), cos, sin))

    ins, outs = (qb, kb), (dq, dk)
    cases = {
        "eager_reference": _grad_fn(call(sf_reference.apply_rotary), ins, outs),
        "compiled_reference": _grad_fn(call(compiled), ins, outs),
        "shardformer": _grad_fn(call(sf_kernels.apply_rotary), ins, outs),
    }
    liger = _liger_impl("rotary")
    if liger is not None:
        cases["liger"] = _grad_fn(call(liger), ins, outs)
    return cases, nbytes


KERNEL_CASES = {"rmsnorm": rmsnorm_cases, "swiglu": swiglu_cases, "rotary": rotary_cases}


def run_kernel(kind: str, shape, device: str, copy: dict | None) -> dict:
    dtype = torch.bfloat16
    result = {"shape": list(shape), "dtype": "bfloat16", "impls": {},
              "shardformer_backend": "cuda" if sf_kernels.available() else "pytorch reference (extension not loaded)"}
    try:
        cases, nbytes = KERNEL_CASES[kind](shape, dtype, device)
    except Exception as exc:  # noqa: BLE001
        result.update(error_record(exc))
        return result
    result["bytes"] = nbytes
    for impl, fn in cases.items():
        try:
            seconds = time_op(fn, device)
            gbps = nbytes / seconds / 1e9
            result["impls"][impl] = {"status": "ok", "ms": seconds * 1e3, "gb_per_s": gbps,
                                     "vs_copy": gbps / copy["gb_per_s"] if copy else None}
        except Exception as exc:  # noqa: BLE001
            result["impls"][impl] = error_record(exc)
    if "liger" not in cases:
        result["impls"]["liger"] = {"status": "skipped", "reason": liger_import_error() or "no such Liger op"}
    del cases
    torch._dynamo.reset()
    free_memory(device)
    return result


# ============================================================================ printing
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_model_table(variants: dict) -> None:
    head = (f"{'variant':<17} {'status':<8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU/989':>8} {'MFU/mm':>7} "
            f"{'peak GiB':>9} {'tok/peer':>9} {'mem/peer':>9} {'breaks':>6} {'loss@1':>8} {'loss@end':>8}")
    log(head)
    log("-" * len(head))
    for name, v in variants.items():
        if v.get("status") != "ok":
            log(f"{name:<17} {v.get('status', '?'):<8} {v.get('reason') or v.get('error', '')}"[:300])
            continue
        log(f"{name:<17} {'ok':<8} {v['tokens_per_s']:>10.1f} {v['model_tflops']:>8.2f} "
            f"{_fmt(v.get('mfu_vs_989'), '.3f'):>8} {_fmt(v.get('mfu_vs_measured_matmul'), '.3f'):>7} "
            f"{_fmt(v.get('peak_mem_gib'), '.2f'):>9} {_fmt(v.get('tokens_vs_best_peer'), '.3f'):>9} "
            f"{_fmt(v.get('peak_mem_vs_best_peer'), '.3f'):>9} {_fmt(v.get('graph_breaks'), 'd'):>6} "
            f"{v['loss_first']:>8.4f} {v['loss_last']:>8.4f}")
    for name, v in variants.items():
        if v.get("shardformer_ops_per_step") is not None:
            log(f"  {name}: shardformer CUDA ops per step {v['shardformer_ops_per_step'] or '{} (none ran)'}; "
                f"modules {v.get('fused_modules')}")
        for r in v.get("graph_break_reasons", []):
            log(f"  {name}: graph break x{r['count']}: {r['reason'][:160]}")


def print_kernel_table(kernels: dict, copy: dict | None) -> None:
    if copy:
        log(f"device copy: {copy['gb_per_s']:.0f} GB/s ({copy['buffer_gib']:.2f} GiB buffer)")
    for kind, k in kernels.items():
        shape = "x".join(map(str, k.get("shape", [])))
        if k.get("status") == "failed":
            log(f"{kind} [{shape}]: failed: {k['error'][:200]}")
            continue
        log(f"{kind} [{shape}] bf16 fwd+bwd, shardformer backend: {k['shardformer_backend']}")
        for impl, r in k["impls"].items():
            if r.get("status") == "ok":
                log(f"  {impl:<20} {r['ms']:>9.3f} ms {r['gb_per_s']:>9.1f} GB/s  {_fmt(r['vs_copy'], '.3f')} x copy")
            else:
                log(f"  {impl:<20} {r['status']}: {(r.get('reason') or r.get('error', ''))[:200]}")


def targets(report: dict) -> dict:
    """Issue 3's acceptance numbers, read off this run (None: not measured in this run)."""
    v = report["variants"]
    sf_ok = [v[n] for n in ("sf_fused", "sf_fused_compile") if v.get(n, {}).get("status") == "ok"]
    best = max(sf_ok, key=lambda r: r["tokens_per_s"]) if sf_ok else None
    liger = v.get("hf_liger", {})
    rms = report["kernels"].get("rmsnorm", {}).get("impls", {}).get("shardformer", {})
    sf_mem = min((r["peak_mem_gib"] for r in sf_ok if r.get("peak_mem_gib")), default=None)
    out = {
        "sf_tokens_vs_best_peer (>= 1.15)": best.get("tokens_vs_best_peer") if best else None,
        "sf_peak_mem_vs_liger (<= 1.0)": (sf_mem / liger["peak_mem_gib"]
                                          if sf_mem and liger.get("status") == "ok" and liger.get("peak_mem_gib")
                                          else None),
        "sf_rmsnorm_vs_copy (>= 0.85)": rms.get("vs_copy") if rms.get("status") == "ok" else None,
        "sf_compiled_graph_breaks": v.get("sf_fused_compile", {}).get("graph_breaks"),
    }
    return out


# ============================================================================ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    env = environment(args)
    out_path = args.out or default_out_path(env)
    config = model_config(args)
    flops = count_flops(config, args.seq)
    report = {
        "complete": False,
        "environment": env,
        "config": {
            "model": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")}
            | {"tied_embeddings": not args.untied, "attn_implementation": "sdpa", "init": "random (seed %d)" % args.seed},
            "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
            "weights": "fp32", "autocast": args.dtype if args.dtype != "fp32" else None,
            "optimizer": f"AdamW(lr={args.lr}, fused={args.device == 'cuda'})",
            "warmup_steps": args.warmup, "timed_steps": args.steps, "compile_mode": args.compile_mode or "default",
            "variants": args.variants, "kernels": args.kernel_list if args.device == "cuda" else [],
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        },
        "flops": flops,
        "peak_tflops_reference": {"tflops": PEAK_TFLOPS_BF16, "what": "H100/H200 SXM dense bf16"},
        "stage_seconds": {},
    }
    log(f"shardformer benchmark: {env['gpu'] or 'CPU'}  torch {env['torch']}  transformers {env['transformers']}  "
        f"liger {env['liger_kernel'] or 'not installed'}")
    log(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, inter "
        f"{args.intermediate}, vocab {args.vocab}, {'untied' if args.untied else 'tied'}; N = {flops['params_N']:,}; "
        f"batch {args.batch} x {args.seq}; {flops['flops_per_token'] / 1e9:.3f} GFLOP/token")
    log(f"results -> {out_path}")

    t0 = time.perf_counter()
    if args.device == "cuda":  # build / load the extension up front, outside every timed region
        report["shardformer_cuda_extension"] = {"loaded": sf_kernels.available(),
                                                "load_s": time.perf_counter() - t0}
        log(f"shardformer CUDA extension loaded: {report['shardformer_cuda_extension']['loaded']} "
            f"({report['shardformer_cuda_extension']['load_s']:.1f} s)")
    mm_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    try:
        report["matmul"] = measure_matmul(args.device, args.matmul_size, mm_dtype)
        log(f"measured matmul: {report['matmul']['tflops']:.1f} TFLOP/s ({args.matmul_size}^3 {report['matmul']['dtype']})")
    except Exception as exc:  # noqa: BLE001
        report["matmul"] = error_record(exc)
        log(f"matmul measurement failed: {report['matmul']['error']}")
    report["stage_seconds"]["matmul"] = time.perf_counter() - t0
    matmul = report["matmul"] if "tflops" in report["matmul"] else None
    save(report, out_path)

    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    report["variants"] = {}
    for name in args.variants:
        log(f"[{name}] ...")
        result = run_variant(name, args, config, ids, flops)
        report["variants"][name] = result
        report["stage_seconds"][name] = result["wall_s"]
        summary = (f"{result['tokens_per_s']:.1f} tokens/s, peak {_fmt(result.get('peak_mem_gib'), '.2f')} GiB"
                   if result["status"] == "ok" else result.get("reason") or result.get("error"))
        log(f"[{name}] {result['status']} in {result['wall_s']:.1f} s: {summary}")
        add_ratios(report["variants"], matmul)
        save(report, out_path)

    report["kernels"] = {}
    if args.device == "cuda" and args.kernel_list:
        t0 = time.perf_counter()
        try:
            report["copy"] = measure_copy(args.device, args.copy_gib)
        except Exception as exc:  # noqa: BLE001
            report["copy"] = error_record(exc)
        copy = report["copy"] if "gb_per_s" in report["copy"] else None
        shapes = TINY_KERNEL_SHAPES if args.tiny else KERNEL_SHAPES
        for kind in args.kernel_list:
            log(f"[kernel {kind}] ...")
            report["kernels"][kind] = run_kernel(kind, shapes[kind], args.device, copy)
            save(report, out_path)
        report["stage_seconds"]["kernels"] = time.perf_counter() - t0
    elif args.kernel_list:
        report["kernels_skipped"] = "kernel micro-benchmarks need CUDA"

    report["targets"] = targets(report) if args.device == "cuda" else "evaluated on CUDA runs only"
    report["complete"] = True
    save(report, out_path)

    log("")
    print_model_table(report["variants"])
    if report["kernels"]:
        log("")
        print_kernel_table(report["kernels"], report.get("copy") if "gb_per_s" in report.get("copy", {}) else None)
    log("")
    if isinstance(report["targets"], dict):
        log("targets (issue 3): " + ", ".join(f"{k} = {_fmt(v, '.3f') if isinstance(v, float) else v}"
                                              for k, v in report["targets"].items()))
    log(f"wrote {out_path}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
