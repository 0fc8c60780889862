"""Pretrain a causal LM with shardformer: tensor, sequence and pipeline parallelism, ZeRO 1-3.

    python examples/pretrain.py                      # the embedded default (below)
    python examples/pretrain.py -c 7b --plugin 3d --tp 4 --pp 2 -l 2048 -b 8 -g -a -d my_corpus/ --nproc 8
    torchrun --nproc_per_node 8 examples/pretrain.py -c 1b --plugin zero2      # torchrun works the same

With no flags it trains the tiny LLaMA (4 layers, hidden 128) with tp = 2 on two processes on the
CPU, on this Python's own standard library source (every machine has it), with a byte-level BPE
tokenizer trained on first use and cached; it needs no network and no GPU and takes about a minute
or two on two cores. Output in --save-dir (runs/pretrain): log.jsonl (one line per step: loss, lr,
grad norm, tokens/s, TFLOP/s, MFU, peak memory), loss.png, checkpoints/ (resumable with --resume)
and model/ (a plain HF checkpoint with its tokenizer; a sample generated from it by plain
transformers ends the run). Without torchrun the script starts its own processes (--nproc on
this machine; --nnodes / --node-rank / --master-addr for several machines). Bad flags end the job
with one line naming the flag, before anything is written. `--help` lists every flag.
"""
import os
import sys

from pretraining import cli, launch  # the package beside this file


def main(argv: list[str]) -> int:
    worker = launch.is_worker()
    try:
        args = cli.parse(argv)
        if worker:
            from pretraining import train

            return train.run(args)
        return _prepare_and_launch(args, argv)
    except ValueError as e:  # our checks and shardformer's setup errors: one line, every rank agrees
        if not worker or os.environ.get("RANK", "0") == "0":
            print(f"pretrain.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


def _prepare_and_launch(args, argv: list[str]) -> int:
    """Check everything that can be checked in one process, train the tokenizer if needed, launch."""
    from pretraining import data

    nproc = args.nproc or launch.default_nproc()
    world = nproc * args.nnodes
    shard_kwargs = cli.layout(args, world, nproc)
    hf_config = cli.model_config(args)
    corpus = data.Corpus(args)
    cli.check_save_dir(args)
    corpus.check()
    has_checkpoint = args.config not in cli.PRESETS and os.path.isdir(args.config) and cli.has_weights(args.config)
    tokenizer = data.hf_tokenizer(data.tokenizer_source(args, corpus, has_checkpoint))
    if args.config in cli.PRESETS:
        hf_config.vocab_size = len(tokenizer)
    cli.run_record(args, hf_config, shard_kwargs, world)
    status = launch.launch(os.path.abspath(__file__), argv, nproc, args.nnodes, args.node_rank, args.master_addr,
                           args.master_port)
    return 128 - status if status < 0 else status  # killed by a signal: 128 + its number


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
