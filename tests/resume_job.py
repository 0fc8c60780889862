"""A tiny training job for the resume test, launched with torchrun: tp = 2, AdamW with a cosine
schedule, a checkpoint after every step, each step's loss appended to <out>/losses.txt by rank 0.
--die-after N: SIGKILL every rank right after step N's checkpoint; --die-in-save N: rank 1 is
killed while writing step N's checkpoint (after its file, before the commit)."""
import argparse
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shardformer as sf  # noqa: E402
from shardformer.checkpoint import resume  # noqa: E402
from tests.models import batch, build  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--die-in-save", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = sf.shard_model(build("llama", num_hidden_layers=2), config=sf.ShardConfig(tp_size=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    start = 0
    ckpt = os.path.join(args.out, "ckpt")
    if args.resume:
        start = sf.load_checkpoint(ckpt, model, opt, sched)["step"]
    for step in range(start + 1, args.steps + 1):
        ids, labels = batch(4, seq=12, seed=step)
        noise = torch.rand(())  # consumes the RNG: a resumed run must restore it
        loss = model.forward_backward(input_ids=ids, labels=labels)
        opt.step()
        sched.step()
        opt.zero_grad()
        if dist.get_rank() == 0:
            with open(os.path.join(args.out, "losses.txt"), "a") as f:
                f.write(f"{step} {loss.item():.10f} {noise.item():.10f}\n")
        if step == args.die_in_save and dist.get_rank() == 1:
            resume._before_commit = lambda: os.kill(os.getpid(), signal.SIGKILL)
        sf.save_checkpoint(ckpt, model, opt, sched, step=step)
        if step == args.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
