"""One rank of `examples/pretrain.py`: build the sharded model, stream its data, train, save.

The model is created directly as shards (`sf.init_model`; or `sf.load_pretrained` when --config
is a checkpoint), trained with `model.forward_backward`, clipped by the global norm, stepped by
AdamW (wrapped in `sf.ZeroOptimizer` at ZeRO 1-3, which keeps fp32 master weights for bf16
parameters), with a linear warmup and a cosine decay. Every --save-every steps and at the end
`sf.save_checkpoint` stores a resumable state (model, optimizer, scheduler, RNG, data position);
at the end `sf.save_pretrained` writes a plain HF checkpoint with the tokenizer, and rank 0
generates a short sample from it with plain transformers.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist

import shardformer as sf
from shardformer.comm import all_or_none

from . import cli, data
from .progress import Progress, plot_loss, read_log

MAX_SAMPLE_PARAMS = 3e9  # larger models are not loaded whole into one process for the sample


def on_rank0(fn):
    """`fn()` on rank 0, its result (or its UsageError) on every rank."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except ValueError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise cli.UsageError(box[0][1])
    return box[0][1]


def say(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def lr_lambda(warmup: int, total: int, floor: float):
    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def attention_implementation(args) -> str:
    if args.flash_attn:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            say("-a: flash-attn is not installed; using SDPA (its flash kernel on GPUs)")
    return "sdpa"


def build_model(args, hf_config, shard_kwargs, has_checkpoint, dtype):
    shard_config = sf.ShardConfig(**shard_kwargs)
    try:
        if has_checkpoint:
            return sf.load_pretrained(args.config, config=shard_config, dtype=dtype)
        return sf.init_model(hf_config, config=shard_config, seed=args.seed, dtype=dtype)
    except ValueError as e:  # the layout does not fit this model: name the flags
        raise cli.UsageError(f"--config {args.config} with --plugin {args.plugin} --tp {shard_kwargs['tp_size']} --pp "
                             f"{shard_kwargs['pp_size']} --sp {shard_kwargs['sp_size']} --zero "
                             f"{shard_kwargs['zero_stage']}: {e}") from None


def build_optimizer(args, model, zero: int, steps: int):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    inner = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    optimizer = sf.ZeroOptimizer(inner, model) if zero else inner
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lr_lambda(args.warmup, steps, args.min_lr_ratio))
    return optimizer, scheduler


def flops_per_token(hf_config, seq_len: int) -> float:
    from bench.flops import count_flops  # examples/bench, beside this package

    return count_flops(hf_config, seq_len)["flops_per_token"]


def prune(ckpt_dir: str, keep: int) -> None:
    """Remove committed checkpoints older than the newest `keep` (never the one `latest` names)."""
    import re
    import shutil

    from shardformer.checkpoint.resume import latest_checkpoint

    newest = os.path.basename(latest_checkpoint(ckpt_dir) or "")
    steps = sorted(int(m.group(1)) for m in (re.fullmatch(r"step-(\d+)", d) for d in os.listdir(ckpt_dir)) if m)
    for step in steps[:-keep]:
        if f"step-{step}" != newest:
            shutil.rmtree(os.path.join(ckpt_dir, f"step-{step}"), ignore_errors=True)


def sample(args, model_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if sum(p.numel() for p in model.parameters()) > MAX_SAMPLE_PARAMS:
        print("sample: skipped (the model is too large to load whole into one process)")
        return
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    torch.manual_seed(args.seed)
    out = model.generate(ids, max_new_tokens=args.sample_tokens, do_sample=True, top_k=40, temperature=0.8,
                         pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    print(f"sample from {model_dir} (plain transformers):\n{text}", flush=True)


def run(args) -> int:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        return _train(args, cuda)
    finally:
        dist.destroy_process_group()


def _train(args, cuda: bool) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    shard_kwargs = cli.layout(args, world, nproc)
    hf_config = cli.model_config(args)
    preset = args.config in cli.PRESETS
    has_checkpoint = not preset and os.path.isdir(args.config) and cli.has_weights(args.config)
    corpus = data.Corpus(args)
    source = on_rank0(lambda: (corpus.check(), data.tokenizer_source(args, corpus, has_checkpoint))[1])
    tokenizer = data.hf_tokenizer(source)
    if preset:
        hf_config.vocab_size = len(tokenizer)
        hf_config.bos_token_id = hf_config.eos_token_id = tokenizer.eos_token_id
        hf_config.pad_token_id = None
    elif len(tokenizer) > hf_config.vocab_size:
        what = f"--tokenizer {args.tokenizer!r}" if args.tokenizer else "the tokenizer trained with --vocab-size"
        raise cli.UsageError(f"{what} has {len(tokenizer)} tokens, more than --config {args.config!r}'s vocab_size "
                             f"{hf_config.vocab_size}: pass a --tokenizer that fits (or --vocab-size)")
    hf_config._attn_implementation = attention_implementation(args)
    hf_config.use_cache = False  # training: no KV cache (and no warning with -g)
    record = on_rank0(lambda: cli.run_record(args, hf_config, shard_kwargs, world))

    wanted = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and cuda) else torch.float32
    zero = shard_kwargs["zero_stage"]
    param_dtype = wanted if zero else torch.float32  # without ZeRO's fp32 masters: fp32 weights under autocast
    autocast = (torch.autocast("cuda" if cuda else "cpu", dtype=wanted) if wanted != torch.float32 and not zero
                else contextlib.nullcontext())
    model = build_model(args, hf_config, shard_kwargs, has_checkpoint, param_dtype)
    model.train()
    dp, dp_rank = model.sf_mesh["dp"].size(), model.sf_mesh.get_local_rank("dp")
    with all_or_none(None, "reading the data"):  # a rank whose part is empty: every rank raises, naming it
        stream = data.PackedBatches(corpus, tokenizer, args.seq_len, args.batch_size, dp_rank, dp)
        batches = iter(stream)
        first = next(batches)
    optimizer, scheduler = build_optimizer(args, model, zero, args.steps)

    ckpt_dir = os.path.join(args.save_dir, "checkpoints")
    log_path = os.path.join(args.save_dir, "log.jsonl")
    start = 0
    if args.resume:
        state = sf.load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        start = state["step"]
        stream.load_state_dict(state["data"])
        batches, first = iter(stream), None
        if rank == 0 and os.path.exists(log_path):  # drop rows logged after that checkpoint
            rows = [r for r in read_log(log_path) if r["step"] <= start]
            with open(log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    elif rank == 0:  # a fresh run (an earlier one that failed before its first checkpoint is replaced)
        os.makedirs(args.save_dir, exist_ok=True)
        if os.path.exists(log_path):
            os.remove(log_path)
        with open(os.path.join(args.save_dir, cli.SAVE_MARKER), "w") as f:
            json.dump(dict(record, args=vars(args)), f, indent=1)
    dist.barrier()
    if start >= args.steps:
        raise cli.UsageError(f"--steps {args.steps}: the run in {args.save_dir!r} has already trained {start} steps")

    precision = str(param_dtype).replace("torch.", "") + (" weights, fp32 masters" if zero and wanted != torch.float32
                                                          else f" weights, {wanted} autocast".replace("torch.", "")
                                                          if wanted != param_dtype else "")
    say(f"pretrain: {args.config} ({hf_config.num_hidden_layers} layers, hidden {hf_config.hidden_size}, vocab "
        f"{hf_config.vocab_size}; {'weights from ' + args.config if has_checkpoint else f'random init, seed {args.seed}'}"
        f") on {world} processes: tp {shard_kwargs['tp_size']} x pp {shard_kwargs['pp_size']} x sp "
        f"{shard_kwargs['sp_size']} x dp {dp}{', sp ' + shard_kwargs['sp_mode'] if 'sp_mode' in shard_kwargs else ''}"
        f", ZeRO {zero}{' + CPU offload' if shard_kwargs['cpu_offload'] else ''}"
        f"{', gradient checkpointing' if args.grad_checkpoint else ''}; {precision}; data: {corpus.label}; "
        f"{args.batch_size} x {args.seq_len} tokens per dp rank and step; steps {start + 1}..{args.steps}")
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if cuda else None)
    progress = Progress(rank == 0, log_path, flops_per_token(hf_config, args.seq_len), peak, world, start, args.steps)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    clip = optimizer.clip_grad_norm_ if zero else model.clip_grad_norm_
    began = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        ids = (first if first is not None else next(batches)).to(device)
        first = None
        with autocast:
            loss = model.forward_backward(input_ids=ids, labels=ids)
        norm = clip(args.grad_clip)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step(step, float(loss), lr, float(norm), ids.numel() * dp)
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            sf.save_checkpoint(ckpt_dir, model, optimizer, scheduler, step=step, data=stream.state_dict())
            if rank == 0:
                prune(ckpt_dir, args.keep)
            progress.restart_clock()  # the save is not the next step's time
    progress.close()
    elapsed = time.perf_counter() - began

    model_dir = os.path.join(args.save_dir, "model")
    sf.save_pretrained(model, model_dir)
    if rank == 0:
        tokenizer.save_pretrained(model_dir)
        rows = read_log(log_path)
        png = plot_loss(log_path, os.path.join(args.save_dir, "loss.png"))
        first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-10:]) / len(rows[-10:])
        print(f"trained steps {start + 1}..{args.steps} in {elapsed:.1f} s; loss {first:.3f} (step {rows[0]['step']})"
              f" -> {last:.3f} (mean of the last {len(rows[-10:])}); log {log_path}, curve {png}, HF checkpoint "
              f"{model_dir}", flush=True)
    dist.barrier()
    if rank == 0 and args.sample_tokens:
        sample(args, model_dir)
    return 0
