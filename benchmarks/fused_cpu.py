"""Step time on CPU with `enable_fused_kernels` on (the default) and off, at tp = 1 and tp = 2.

    python benchmarks/fused_cpu.py [--hidden 512 --layers 4 --vocab 32000 --batch 4 --seq 256 --steps 8]

Where no CUDA kernel runs, the default must cost no step time: without the extension nothing is
substituted (HF's norms, MLPs and loss run; `SHARDFORMER_FUSED_LOSS=always` would keep the chunked
loss, which measured about 4 % slower here). Each tp size runs in its own gloo
world (1 and 2 processes); both models are built from the same weights and trained with AdamW on
the same batches, their steps interleaved (on, off, on, off, ...) after one warm-up step each, and
the minimum over `--steps` steps is reported, with the ratio on / off.
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, args, out):
    import shardformer as sf
    from transformers import LlamaConfig, LlamaForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab)
    base = LlamaForCausalLM(config)
    models = {name: sf.shard_model(copy.deepcopy(base), config=sf.ShardConfig(tp_size=world, enable_fused_kernels=on))
              for name, on in (("on", True), ("off", False))}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in models}
    for step in range(args.steps + 1):
        for name, model in models.items():
            dist.barrier()
            began = time.perf_counter()
            model.forward_backward(input_ids=ids, labels=ids)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            dist.barrier()
            if step:  # the first step of each is a warm-up
                times[name].append(time.perf_counter() - began)
    if rank == 0:
        out.put((world, {name: min(t) for name, t in times.items()}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    from shardformer.kernels import cuda

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; CUDA extension loaded: {cuda.available()}; LLaMA "
          f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch} x {args.seq}; min of "
          f"{args.steps} interleaved steps", flush=True)
    ctx = mp.get_context("spawn")
    rows = []
    for world in (1, 2):
        out = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True,
                           start_method="spawn")
        rows.append(out.get())
    print(f"{'tp':>3} {'fused on (ms)':>14} {'fused off (ms)':>15} {'on / off':>9}")
    for world, t in rows:
        print(f"{world:>3} {1e3 * t['on']:>14.1f} {1e3 * t['off']:>15.1f} {t['on'] / t['off']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
