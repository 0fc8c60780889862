"""Single-GPU training benchmark: HF eager, HF + torch.compile, HF + Liger-Kernel and shardformer's
fused kernels, side by side in one process, on the same model and the same batch.

Full run (one H100 / H200; writes benchmarks/results/<gpu-name>-<YYYY-MM-DD>.json):

    python examples/benchmark.py

CPU smoke test (tiny model, fp32; the compiled kernel references and Liger are skipped on CPU;
writes to the temp directory):

    python examples/benchmark.py --tiny --device cpu --dtype fp32 --steps 2 --warmup 1

``--out PATH`` writes the JSON elsewhere; ``--only`` / ``--kernels`` pick a subset; ``--time-budget S``
skips the stages that no longer fit in S seconds (``--help``).

Model variants (each a fresh model with the same seed, so the same initial weights):

    hf_eager          transformers, attn_implementation="sdpa"
    hf_compile        the same model wrapped in torch.compile (whole model)
    hf_liger          Liger-Kernel's apply_liger_kernel_to_llama(model=...) (only if it imports)
    sf_fused          sf.shard_model(model, ShardConfig(tp_size=1, enable_fused_kernels=True))
    sf_fused_compile  the shardformer model wrapped in torch.compile (inside the compiled graph
                      RMSNorm, SwiGLU and rotary are left to Inductor, which fuses them with their
                      neighbours; the chunked LM head + cross-entropy stays shardformer's kernel)
    sf_fused_compile_custom  the same with SHARDFORMER_COMPILED_KERNELS=custom: shardformer's CUDA
                      kernels as opaque custom ops inside the graph (run last; tells which is faster)

Default model: Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocab 128256, tied embeddings), random init (nothing is downloaded), batch 8 x 2048, fp32 weights under
bf16 autocast, fused AdamW. A step is forward with labels, backward, optimizer step, zero_grad.
``--warmup`` untimed steps come first (compilation happens there), then ``--steps`` steps are timed
with CUDA events. Per variant: tokens/s, model TFLOP/s, MFU against 989 TFLOP/s (H100/H200 dense
bf16) and against the bf16 matmul rate measured in this run, peak memory (max_memory_allocated minus
what was allocated before the variant; model, gradients and optimizer state included), the ratio to
the best peer (peers: hf_compile and hf_liger; tokens/s against the fastest, memory against the
leanest), first and last loss (every variant trains the same model on the same batch: they must
agree to bf16 accuracy), graph breaks and recompilations of the compiled variants, and which
shardformer CUDA ops ran per step.

FLOPs per token (DESIGN.md): 6 N + 12 L H S; L layers, H hidden size, S sequence length, attention
counted full (not causal). N counts the parameters whose matmuls run: all but the input embedding,
whose lookup costs no FLOPs. With tied embeddings that matrix is still the LM head's weight and its
matmul runs, so it is counted once (N = unique parameters); untied, N = all minus the input embedding.
Llama-3.2-1B: N = 1.236e9, 8.22 GFLOP/token, 134.7 TFLOP per 8 x 2048 step.

Kernel micro-benchmarks, forward + backward, bf16 on CUDA: eager reference (HF's own module or
function where one exists), torch.compile of it, shardformer, Liger. Memory-bound kernels report GB/s
against a device-to-device copy (``dst.copy_(src)``, bytes = 2 x buffer) measured in this run; the
bytes are the least DRAM traffic of a forward kernel and a backward kernel (an input the backward
needs is read by both; re-reads within one kernel are not counted):
    rmsnorm    [rows, hidden]     forward reads x, weight, writes y; backward reads dy, x, weight, writes dx, dweight
    swiglu     [rows, inter]      forward reads gate, up, writes y; backward reads dy, gate, up, writes dgate, dup
    rotary     q [B, Hq, S, D], k [B, Hkv, S, D] (views of HF's [B, S, heads, D]), cos/sin [1, S, D]
                                  reads q, k, cos, sin, dq_out, dk_out; writes q_out, k_out, dq, dk
The LM head + cross-entropy ``linear_ce`` [tokens, hidden] x [vocab, hidden] is compute-bound: it
reports TFLOP/s (6 x tokens x hidden x vocab) against the measured matmul rate, and each
implementation's extra peak memory (the eager one materialises bf16 and fp32 logits).

Run order: every HF variant before any shardformer kernel touches the GPU (a faulting kernel poisons
the CUDA context for the rest of the process), then what the issue's targets need (sf_fused, the
RMSNorm kernel, sf_fused_compile), then the other kernels, the compiled kernel references and
sf_fused_compile_custom, which a short --time-budget drops first. Every stage runs inside try/except
(OOM, compile error, missing package: recorded, the run goes on); the JSON is rewritten after every
stage, and SIGTERM (``timeout``) or Ctrl-C records the interrupted stage, writes the JSON and prints
the table before exiting.
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
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

import shardformer as sf
from shardformer import kernels as sf_kernels
from shardformer.kernels import ops as sf_ops
from shardformer.kernels import reference as sf_reference

HF_APPLY_ROTARY = modeling_llama.apply_rotary_pos_emb  # captured before anything rebinds it
PEAK_TFLOPS_BF16 = 989.0  # H100 / H200 SXM dense bf16, the MFU denominator DESIGN.md fixes
VARIANTS = ("hf_eager", "hf_compile", "hf_liger", "sf_fused", "sf_fused_compile", "sf_fused_compile_custom")
PEERS = ("hf_compile", "hf_liger")
COMPILED = ("hf_compile", "sf_fused_compile", "sf_fused_compile_custom")
KERNELS = ("rmsnorm", "swiglu", "rotary", "linear_ce")
EST_S = {"variant": 25, "compiled": 90, "kernel": 10, "kernel_compiled": 20}  # for --time-budget
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3

LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batch=8, seq=2048)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=250, batch=2, seq=64)
# rmsnorm (rows, hidden), swiglu (rows, inter), rotary (B, Hq, Hkv, S, D), linear_ce (tokens, hidden, vocab)
KERNEL_SHAPES = dict(rmsnorm=(32768, 4096), swiglu=(16384, 8192), rotary=(8, 32, 8, 2048, 64),
                     linear_ce=(16384, 2048, 128256))
TINY_KERNEL_SHAPES = dict(rmsnorm=(1024, 256), swiglu=(1024, 256), rotary=(2, 4, 2, 64, 16), linear_ce=(256, 64, 1000))


def log(msg: str = "") -> None:
    print(msg, flush=True)


class Interrupted(BaseException):
    """SIGTERM arrived (a BaseException, so no stage's `except Exception` swallows it)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; the report is written next
    raise Interrupted("SIGTERM")


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
                   help="autocast dtype over fp32 weights (fp32 = no autocast) and kernel dtype; "
                        "default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="tiny model (hidden 64, 2 layers, vocab 250, batch 2 x 64) "
                                                       "and tiny kernel shapes")
    for name in LLAMA_1B:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {LLAMA_1B[name]} ({TINY[name]} with --tiny)")
    p.add_argument("--untied", action="store_true", help="separate LM head (default: tied embeddings)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}, or none")
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help=f"kernel micro-benchmarks: subset of {', '.join(KERNELS)}, or none "
                        "(full-size shapes need CUDA; on CPU they run with --tiny)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds from start: a stage that would not fit is skipped and recorded as such")
    p.add_argument("--matmul-size", type=int, default=None, help="square bf16 matmul that measures the achievable "
                                                                 "rate (default 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--copy-gib", type=float, default=1.0, help="buffer size of the device-copy bandwidth test")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/<gpu>-<date>.json on CUDA, the temp dir on CPU)")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    for name, value in (TINY if args.tiny else LLAMA_1B).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.variants = _names(args.only, VARIANTS, "--only")
    args.kernel_list = _names(args.kernels, KERNELS, "--kernels")
    args.matmul_size = args.matmul_size or (8192 if args.device == "cuda" else 1024)
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
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except Exception:  # noqa: BLE001 - a copy without .git, no git binary: just unknown
        return None


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def environment(args) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    env = {"date": now.strftime("%Y-%m-%d"), "time_utc": now.isoformat(timespec="seconds"), "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "triton": _dist_version("triton"), "liger_kernel": _dist_version("liger-kernel"),
           "shardformer": getattr(sf, "__version__", None), "shardformer_commit": _git_commit()}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu_memory_gib": round(props.total_memory / GIB, 1), "gpu_sm_count": props.multi_processor_count}
    return env


def results_path(env: dict) -> str:
    if env["device"] == "cuda":
        return os.path.join(REPO_ROOT, "benchmarks", "results", f"{_slug(env['gpu'])}-{env['date']}.json")
    return os.path.join(tempfile.gettempdir(), f"shardformer-benchmark-cpu-{env['date']}.json")


def save(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def error_record(exc: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:]}


# ============================================================================ timing, memory
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


# ============================================================================ FLOPs, reference rates
def count_flops(config: LlamaConfig, seq: int) -> dict:
    """FLOPs per token = 6 N + 12 L H S (the module docstring says what N counts)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    unique = {id(p): p.numel() for p in model.parameters()}  # a tied matrix once
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    n = sum(unique.values()) - (0 if tied else embedding.numel())
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq
    return {"params_unique": sum(unique.values()), "params_embedding": embedding.numel(), "params_N": n,
            "tied_embeddings": tied, "flops_per_token": 6 * n + attention, "flops_per_token_attention": attention,
            "convention": "6*N + 12*L*H*S; N = unique parameters except the input embedding's lookup "
                          "(tied: the shared matrix counted once, as the LM head); full attention"}


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


# ============================================================================ model variants
def liger_import_error() -> str | None:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"liger_kernel does not import ({type(exc).__name__}: {exc})"


def skip_reason(name: str, args) -> str | None:
    if name == "hf_liger":
        return liger_import_error() or (None if args.device == "cuda" else "Liger-Kernel's Triton kernels need CUDA")
    return None


def ensure_process_group(device: str) -> str:
    """A world of 1 unless one exists (nccl on CUDA, gloo if nccl does not start, gloo on CPU); its backend.
    With tp = dp = 1 shardformer runs no collective, so the backend costs nothing in the timed steps."""
    for backend in (("nccl", "gloo") if device == "cuda" else ("gloo",)):
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


def shardformer_ops_per_step(step) -> dict:
    """One extra (untimed) step under the profiler: how often each shardformer:: op ran."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: dict = {}
    for event in prof.events():
        if event.name.startswith("shardformer::"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return dict(sorted(counts.items()))


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
        if name.startswith("sf_"):
            info["shardformer_ops_per_step"] = shardformer_ops_per_step(step)
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


def add_ratios(variants: dict, matmul: dict | None) -> None:
    """MFU against 989 and against the measured matmul rate; ratios to the best peer; loss agreement."""
    ok = {n: v for n, v in variants.items() if v.get("status") == "ok"}
    peers = {n: ok[n] for n in PEERS if n in ok}
    fastest = max(peers, key=lambda n: peers[n]["tokens_per_s"]) if peers else None
    with_mem = {n: p for n, p in peers.items() if p.get("peak_mem_gib")}
    leanest = min(with_mem, key=lambda n: with_mem[n]["peak_mem_gib"]) if with_mem else None
    ref_loss = ok.get("hf_eager", {}).get("loss_first")
    for v in ok.values():
        v["mfu_vs_989"] = v["model_tflops"] / PEAK_TFLOPS_BF16
        v["mfu_vs_measured_matmul"] = v["model_tflops"] / matmul["tflops"] if matmul else None
        v["best_peer_tokens"], v["best_peer_mem"] = fastest, leanest
        v["tokens_vs_best_peer"] = v["tokens_per_s"] / peers[fastest]["tokens_per_s"] if fastest else None
        v["peak_mem_vs_best_peer"] = (v["peak_mem_gib"] / with_mem[leanest]["peak_mem_gib"]
                                      if leanest and v.get("peak_mem_gib") else None)
        v["loss_first_rel_diff_vs_hf_eager"] = abs(v["loss_first"] - ref_loss) / abs(ref_loss) if ref_loss else None


# ============================================================================ kernel micro-benchmarks
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
    if not compiled and "liger" not in todo:
        result["impls"]["liger"] = {"status": "skipped", "reason": liger_import_error() or "Liger-Kernel needs CUDA"}
    del case, todo
    torch._dynamo.reset()
    free_memory(device)
    return result


# ============================================================================ printing
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_model_table(variants: dict) -> None:
    head = (f"{'variant':<23} {'status':<11} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU/989':>7} {'MFU/mm':>6} "
            f"{'peak GiB':>8} {'tok/peer':>8} {'mem/peer':>8} {'breaks':>6} {'loss@1':>8} {'loss@end':>8}")
    log(head)
    log("-" * len(head))
    for name in [n for n in VARIANTS if n in variants]:
        v = variants[name]
        if v.get("status") != "ok":
            log(f"{name:<23} {v.get('status', '?'):<11} {v.get('reason') or v.get('error', '')}"[:300])
            continue
        log(f"{name:<23} {'ok':<11} {v['tokens_per_s']:>9.0f} {v['model_tflops']:>8.1f} "
            f"{_fmt(v.get('mfu_vs_989'), '.3f'):>7} {_fmt(v.get('mfu_vs_measured_matmul'), '.3f'):>6} "
            f"{_fmt(v.get('peak_mem_gib'), '.2f'):>8} {_fmt(v.get('tokens_vs_best_peer'), '.3f'):>8} "
            f"{_fmt(v.get('peak_mem_vs_best_peer'), '.3f'):>8} {_fmt(v.get('graph_breaks'), 'd'):>6} "
            f"{v['loss_first']:>8.4f} {v['loss_last']:>8.4f}")
    for name, v in variants.items():
        if "shardformer_ops_per_step" in v:
            log(f"  {name}: shardformer ops per step {v['shardformer_ops_per_step'] or '{} (none ran)'}; "
                f"modules {v.get('fused_modules')}")
        if v.get("recompiled_while_timed"):
            log(f"  {name}: RECOMPILED during the timed steps (the timing includes compilation)")
        for r in v.get("graph_break_reasons", []):
            log(f"  {name}: graph break x{r['count']}: {r['reason'][:160]}")


def print_kernel_table(report: dict) -> None:
    if report.get("copy", {}).get("gb_per_s"):
        log(f"device copy: {report['copy']['gb_per_s']:.0f} GB/s ({report['copy']['buffer_gib']:.2f} GiB buffer)")
    for kind, k in report["kernels"].items():
        if k.get("status") in ("failed", "skipped"):
            log(f"{kind}: {k['status']}: {(k.get('error') or k.get('reason', ''))[:200]}")
            continue
        shape = "x".join(map(str, k["shape"]))
        log(f"{kind} [{shape}] {k['dtype']} fwd+bwd (shardformer: {k.get('shardformer_backend')})")
        for impl, r in k["impls"].items():
            if r.get("status") != "ok":
                log(f"  {impl:<12} {r['status']}: {(r.get('reason') or r.get('error', ''))[:200]}")
            else:
                rate = (f"{r['gb_per_s']:>7.0f} GB/s {_fmt(r['vs_copy'], '.3f'):>6} x copy" if "gb_per_s" in r
                        else f"{r['tflops']:>7.1f} TFLOP/s {_fmt(r['vs_matmul'], '.3f'):>6} x matmul")
                mem = f"  +{r['extra_peak_mem_gib']:.2f} GiB peak" if r["extra_peak_mem_gib"] is not None else ""
                log(f"  {impl:<12} {r['ms']:>8.3f} ms {rate}{mem}")


def targets(report: dict) -> dict:
    """Issue 3's acceptance numbers, read off this run (None: not measured in this run)."""
    v = report["variants"]
    sf_ok = [v[n] for n in ("sf_fused", "sf_fused_compile", "sf_fused_compile_custom") if v.get(n, {}).get("status") == "ok"]
    best = max(sf_ok, key=lambda r: r["tokens_per_s"]) if sf_ok else {}
    liger = v.get("hf_liger", {})
    rms = report["kernels"].get("rmsnorm", {}).get("impls", {}).get("shardformer", {})
    sf_mem = best.get("peak_mem_gib")  # the same (fastest) shardformer variant for speed and memory
    liger_mem = liger.get("peak_mem_gib") if liger.get("status") == "ok" else None
    return {
        "sf_tokens_vs_best_peer (>= 1.15)": best.get("tokens_vs_best_peer"),
        "sf_peak_mem_vs_liger (<= 1.0)": sf_mem / liger_mem if sf_mem and liger_mem else None,
        "sf_rmsnorm_vs_copy (>= 0.85)": rms.get("vs_copy") if rms.get("status") == "ok" else None,
        "sf_compiled_graph_breaks": v.get("sf_fused_compile", {}).get("graph_breaks"),
    }


# ============================================================================ main
def plan_stages(args) -> list[tuple[str, str]]:
    """(kind, name) in run order: HF variants before any shardformer kernel; then what the issue's
    targets need (sf_fused, the RMSNorm kernel, sf_fused_compile), so a short budget drops the rest:
    the other kernels, the compiled kernel references, sf_fused_compile_custom."""
    kernels = args.kernel_list if (args.device == "cuda" or args.tiny) else []
    plan = [("variant", n) for n in ("hf_eager", "hf_liger", "hf_compile", "sf_fused") if n in args.variants]
    plan += [("kernel", k) for k in kernels if k == "rmsnorm"]
    plan += [("variant", "sf_fused_compile")] if "sf_fused_compile" in args.variants else []
    plan += [("kernel", k) for k in kernels if k != "rmsnorm"]
    plan += [("kernel_compiled", k) for k in kernels] if args.device == "cuda" else []
    plan += [("variant", "sf_fused_compile_custom")] if "sf_fused_compile_custom" in args.variants else []
    return plan


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    env = environment(args)
    out_path = args.out or results_path(env)
    config = model_config(args)
    flops = count_flops(config, args.seq)
    report = {
        "complete": False, "environment": env,
        "results_file": os.path.relpath(results_path(env), REPO_ROOT) if args.device == "cuda" else None,
        "config": {
            "model": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")}
            | {"tied_embeddings": not args.untied, "attn_implementation": "sdpa", "init": f"random (seed {args.seed})"},
            "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq, "weights": "fp32",
            "autocast": None if args.dtype == "fp32" else args.dtype,
            "optimizer": f"AdamW(lr={args.lr}, fused={args.device == 'cuda'})",
            "warmup_steps": args.warmup, "timed_steps": args.steps, "compile_mode": args.compile_mode or "default",
            "time_budget_s": args.time_budget, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        },
        "flops": flops,
        "peak_tflops_reference": {"tflops": PEAK_TFLOPS_BF16, "what": "H100/H200 SXM dense bf16"},
        "stage_seconds": {}, "variants": {}, "kernels": {},
    }
    log(f"shardformer benchmark: {env['gpu'] or 'CPU'}  torch {env['torch']}  transformers {env['transformers']}  "
        f"triton {env['triton']}  liger {env['liger_kernel'] or 'not installed'}")
    log(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, inter "
        f"{args.intermediate}, vocab {args.vocab}, {'untied' if args.untied else 'tied'}; N = {flops['params_N']:,}; "
        f"batch {args.batch} x {args.seq}; {flops['flops_per_token'] / 1e9:.3f} GFLOP/token")
    log(f"results -> {out_path}")

    ceilings: dict = {}
    stage = "ceilings"
    try:
        t0 = time.perf_counter()
        mm_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        for key, measure in (("matmul", lambda: measure_matmul(args.device, args.matmul_size, mm_dtype)),
                             ("copy", lambda: measure_copy(args.device, args.copy_gib if not args.tiny else 0.01))):
            try:
                report[key] = ceilings[key] = measure()
            except Exception as exc:  # noqa: BLE001
                report[key] = error_record(exc)
            free_memory(args.device)
        log(f"measured: matmul {_fmt(ceilings.get('matmul', {}).get('tflops'), '.1f')} TFLOP/s "
            f"({args.matmul_size}^3), device copy {_fmt(ceilings.get('copy', {}).get('gb_per_s'), '.0f')} GB/s")
        report["stage_seconds"]["ceilings"] = time.perf_counter() - t0
        save(report, out_path)

        gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
        shapes = TINY_KERNEL_SHAPES if args.tiny else KERNEL_SHAPES
        for kind, name in plan_stages(args):
            stage = f"{kind} {name}"
            est = EST_S["compiled" if name in COMPILED else kind]
            left = None if args.time_budget is None else args.time_budget - (time.perf_counter() - t_start)
            t0 = time.perf_counter()
            if left is not None and left < est:
                result = {"status": "skipped", "reason": f"time budget: {left:.0f} s left, stage needs ~{est} s"}
            elif kind == "variant":
                log(f"[{name}] ...")
                result = run_variant(name, args, config, ids, flops)
            else:
                log(f"[{kind} {name}] ...")
                result = run_kernel(name, shapes[name], args, ceilings, report["kernels"].get(name),
                                    compiled=kind == "kernel_compiled")
            report["stage_seconds"][stage] = time.perf_counter() - t0
            if kind == "variant":
                report["variants"][name] = result
                add_ratios(report["variants"], ceilings.get("matmul"))
                summary = (f"{result['tokens_per_s']:.0f} tokens/s, peak {_fmt(result.get('peak_mem_gib'), '.2f')} GiB"
                           if result["status"] == "ok" else result.get("reason") or result.get("error"))
                log(f"[{name}] {result['status']} in {report['stage_seconds'][stage]:.1f} s: {summary}")
            elif kind == "kernel_compiled" and result.get("status") == "skipped":
                report["kernels"].setdefault(name, {}).setdefault("impls", {})["compiled"] = result
            else:
                report["kernels"][name] = result
            save(report, out_path)
        report["complete"] = True
    except (Interrupted, KeyboardInterrupt) as exc:
        by = str(exc) or type(exc).__name__
        report["interrupted"] = {"by": by, "stage": stage, "after_s": time.perf_counter() - t_start}
        kind, _, name = stage.partition(" ")
        if kind == "variant":
            report["variants"][name] = {"status": "interrupted", "reason": f"{by} during this stage"}
        log(f"interrupted ({by}) during {stage}; writing what was measured")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    report["targets"] = targets(report) if args.device == "cuda" else "evaluated on CUDA runs only"
    report["total_s"] = time.perf_counter() - t_start
    save(report, out_path)

    log("")
    print_model_table(report["variants"])
    if report["kernels"]:
        log("")
        print_kernel_table(report)
    log("")
    if isinstance(report["targets"], dict):
        log("targets (issue 3): " + ", ".join(f"{k} = {_fmt(v, '.3f') if isinstance(v, float) else v}"
                                              for k, v in report["targets"].items()))
    commit_as = report["results_file"] if report["results_file"] and out_path != results_path(env) else None
    log(f"wrote {out_path} ({'complete' if report['complete'] else 'PARTIAL'}, {report['total_s']:.0f} s)"
        + (f"; commit it as {commit_as}" if commit_as else ""))
    if dist.is_initialized():
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["complete"] else 2)
