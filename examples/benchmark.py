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
shardformer CUDA ops ran per step. One more, untimed step per variant runs under torch.profiler: on
CUDA it records the GPU time of a step by kind of kernel (gemm, attention, shardformer, triton,
optimizer, copy, other) and the heaviest kernels, so a missed target says where the time went.

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
``attention`` [B, Hq, Hkv, S, D] times HF's SDPA call (causal, GQA) on SDPA's default choice and on
each backend forced (flash, cuDNN, memory-efficient), in TFLOP/s (causal: forward 2 B Hq S^2 D,
backward 2.5x); shardformer ships no attention kernel, so this says which backend to prefer.

Run order: every HF variant before any shardformer kernel touches the GPU (a faulting kernel poisons
the CUDA context for the rest of the process), then what the issue's targets need (sf_fused, the
RMSNorm kernel, sf_fused_compile), then the other kernels, the compiled kernel references and
sf_fused_compile_custom, which a short --time-budget drops first. Every stage runs inside try/except
(OOM, compile error, missing package: recorded, the run goes on); the JSON is rewritten after every
stage, and SIGTERM (``timeout``) or Ctrl-C records the interrupted stage, writes the JSON and prints
the table before exiting.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # run as a script it is sys.path[0] already; loaded otherwise (runpy, -m) maybe not
    sys.path.insert(0, _HERE)

from bench.cli import model_config, parse_args, plan_stages  # noqa: E402 - the package beside this file
from bench.common import (COMPILED, EST_S, KERNEL_SHAPES, PEAK_TFLOPS_BF16, REPO_ROOT,  # noqa: E402
                          TINY_KERNEL_SHAPES, Interrupted, error_record, log, on_sigterm)
from bench.flops import count_flops  # noqa: E402
from bench.kernels import run_kernel  # noqa: E402
from bench.report import (add_ratios, environment, fmt, print_kernel_table, print_model_table,  # noqa: E402
                          print_profile_table, results_path, save, targets)
from bench.timing import free_memory, measure_copy, measure_matmul  # noqa: E402
from bench.variants import run_variant  # noqa: E402


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv, __doc__)
    signal.signal(signal.SIGTERM, on_sigterm)
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
        log(f"measured: matmul {fmt(ceilings.get('matmul', {}).get('tflops'), '.1f')} TFLOP/s "
            f"({args.matmul_size}^3), device copy {fmt(ceilings.get('copy', {}).get('gb_per_s'), '.0f')} GB/s")
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
                summary = (f"{result['tokens_per_s']:.0f} tokens/s, peak {fmt(result.get('peak_mem_gib'), '.2f')} GiB"
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
    print_profile_table(report["variants"])
    if report["kernels"]:
        log("")
        print_kernel_table(report)
    log("")
    if isinstance(report["targets"], dict):
        log("targets (issue 3): " + ", ".join(f"{k} = {fmt(v, '.3f') if isinstance(v, float) else v}"
                                              for k, v in report["targets"].items()))
    commit_as = report["results_file"] if report["results_file"] and out_path != results_path(env) else None
    log(f"wrote {out_path} ({'complete' if report['complete'] else 'PARTIAL'}, {report['total_s']:.0f} s)"
        + (f"; commit it as {commit_as}" if commit_as else ""))
    if dist.is_initialized():
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["complete"] else 2)
