"""Command line, the model config it describes, and the run order of the stages."""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig

from .common import KERNELS, LLAMA_1B, NOT_COMPILED, TINY, VARIANTS


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {', '.join(allowed)} (comma separated) or none")
    return names


def parse_args(argv=None, doc: str = "") -> argparse.Namespace:
    """`doc`: the entry script's docstring; its first paragraph is --help's description."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
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


def plan_stages(args) -> list[tuple[str, str]]:
    """(kind, name) in run order: HF variants before any shardformer kernel; then what the issue's
    targets need (sf_fused, the RMSNorm kernel, sf_fused_compile), so a short budget drops the rest:
    the other kernels, the compiled kernel references, sf_fused_compile_custom."""
    kernels = args.kernel_list if (args.device == "cuda" or args.tiny) else []
    plan = [("variant", n) for n in ("hf_eager", "hf_liger", "hf_compile", "sf_fused") if n in args.variants]
    plan += [("kernel", k) for k in kernels if k == "rmsnorm"]
    plan += [("variant", "sf_fused_compile")] if "sf_fused_compile" in args.variants else []
    plan += [("kernel", k) for k in kernels if k != "rmsnorm"]
    plan += [("kernel_compiled", k) for k in kernels if k not in NOT_COMPILED] if args.device == "cuda" else []
    plan += [("variant", "sf_fused_compile_custom")] if "sf_fused_compile_custom" in args.variants else []
    return plan
