"""Fine-tune a causal LM with `transformers.Trainer` on a sharded model.

    python examples/finetune_hf_trainer.py                                   # the embedded default (below)
    torchrun --nproc_per_node 2 examples/finetune_hf_trainer.py --tp 2
    torchrun --nproc_per_node 4 examples/finetune_hf_trainer.py --tp 2 --zero 2        # tp 2 x dp 2, ZeRO-2
    torchrun --nproc_per_node 4 examples/finetune_hf_trainer.py --model Qwen/Qwen2.5-0.5B \\
        -d wikitext --dataset-config wikitext-2-raw-v1 --tp 2 --bf16

This is the ordinary Trainer script (the shape of transformers' run_clm.py: a model and its
tokenizer, text packed into blocks with labels, `default_data_collator`, `Trainer`, train,
evaluate, save) with two lines changed, marked `# shardformer`:
`model = sf.shard_model(model, config=sf.ShardConfig(...))` and `Trainer` -> `ShardedTrainer`.
`--unsharded` runs the stock script itself (`transformers.Trainer` on the unsharded model, DDP
over every process) for comparison.

With no flags it fine-tunes the tiny LLaMA (4 layers, hidden 128, random init: no download) on
one CPU process on this Python's standard-library source (the pretraining job's default corpus,
with its byte-level BPE tokenizer, trained on first use and cached), 200 steps of 8 x 128
tokens, and saves the model with its tokenizer into --output-dir (runs/finetune): a plain HF
directory that `AutoModelForCausalLM.from_pretrained` loads. `--model` takes an HF model id or
path (its tokenizer too), `-d` an HF dataset name or local text / JSONL files. Under `torchrun`
every data-parallel rank (world / (tp x sp)) reads its own batches of --batch-size sequences.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the pretraining package beside this file

TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune_hf_trainer.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", default="tiny", help="tiny (a 4-layer LLaMA, random init), or an HF model id / path")
    a("-d", "--dataset", help="an HF dataset name, or local .txt / .jsonl / .json files, folders or globs "
                              "(default: this Python's standard library source)")
    a("--dataset-config", help="the HF dataset's configuration name")
    a("--text-field", default="text", help="the text column of the dataset / JSONL records")
    a("--tokenizer", help="an HF tokenizer id / path (default: the model's; for tiny a BPE trained on the data)")
    a("--vocab-size", type=int, default=2048, help="vocabulary of the trained BPE (tiny)")
    a("--block-size", type=int, default=128, help="tokens per training sequence")
    a("--batch-size", type=int, default=8, help="sequences per data-parallel rank and micro-step")
    a("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    a("--steps", type=int, default=200, help="optimizer steps (max_steps)")
    a("--train-blocks", type=int, help="training sequences read from the corpus (default: enough for --steps)")
    a("--eval-blocks", type=int, default=32, help="held-out sequences evaluated at the end (0: none)")
    a("--lr", type=float, default=2e-3)
    a("--warmup-steps", type=int, default=10)
    a("--weight-decay", type=float, default=0.1)
    a("--adam-eps", type=float, default=1e-8, help="AdamW epsilon (TrainingArguments.adam_epsilon)")
    a("--max-grad-norm", type=float, default=1.0)
    a("--save-steps", type=int, default=0, help="a Trainer checkpoint every this many steps (0: none)")
    a("--output-dir", default="runs/finetune")
    a("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
      help="resume from a Trainer checkpoint directory (default: the latest in --output-dir)")
    a("--seed", type=int, default=42)
    a("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    a("-g", "--grad-checkpoint", action="store_true", help="gradient checkpointing")
    a("--tp", type=int, default=1, help="tensor-parallel size")
    a("--sp", type=int, default=1, help="sequence-parallel size (all_to_all / ring)")
    a("--sp-mode", choices=("split_gather", "all_to_all", "ring"),
      help="sequence parallelism (default all_to_all with --sp)")
    a("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage (sf.ZeroOptimizer through the Trainer)")
    a("--unsharded", action="store_true", help="the stock script: transformers.Trainer, the unsharded model, DDP")
    return p.parse_args(argv)


def init_distributed() -> None:
    """The process group: torchrun's (accelerate has made it), or a world of one for plain `python`."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        from pretraining.launch import free_port

        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def load_tokenizer(args, corpus, main_first):
    from pretraining import data

    if args.tokenizer or args.model != "tiny":
        return data.hf_tokenizer(args.tokenizer or args.model)
    with main_first("training the tokenizer"):  # rank 0 trains and caches it, the others read the cache
        return data.hf_tokenizer(("json", data.train_bpe(corpus, args.vocab_size)[0]))


def read_blocks(corpus, tokenizer, block_size: int, count: int) -> list[list[int]]:
    """The first `count` blocks of `block_size` tokens: documents tokenized, each followed by the
    end-of-text token, concatenated and cut (run_clm's `group_texts`)."""
    blocks, buffer, eos = [], [], tokenizer.eos_token_id
    for record in corpus.stream():
        buffer += tokenizer(record[corpus.text_field], add_special_tokens=False)["input_ids"]
        buffer += [eos] if eos is not None else []
        while len(buffer) >= block_size and len(blocks) < count:
            blocks.append(buffer[:block_size])
            del buffer[:block_size]
        if len(blocks) == count:
            return blocks
    raise ValueError(f"--dataset: {corpus.label} holds only {len(blocks)} blocks of {block_size} tokens, "
                     f"{count} wanted (fewer --steps, --train-blocks or --eval-blocks)")


def build_model(args, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(args.seed)  # the same initial weights on every rank
    if args.model == "tiny":
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **TINY)
        return LlamaForCausalLM(config)
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)


def shard_config(args):
    import shardformer as sf

    mode = args.sp_mode or ("all_to_all" if args.sp > 1 else None)
    return sf.ShardConfig(tp_size=args.tp, sp_size=args.sp, sp_mode=mode, zero_stage=args.zero,
                          gradient_checkpointing=args.grad_checkpoint)


def main(argv: list[str] | None = None) -> dict:
    import transformers
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    import shardformer as sf
    from pretraining.data import Corpus
    from shardformer.hf_trainer import ShardedTrainer

    args = parse(argv)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, adam_epsilon=args.adam_eps, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, lr_scheduler_type="cosine", max_grad_norm=args.max_grad_norm,
        logging_steps=1, report_to="none",
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, seed=args.seed,
        bf16=args.bf16, dataloader_drop_last=True, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True,
        use_cpu=not torch.cuda.is_available())  # accelerate runs CPU processes distributed only with use_cpu
    training_args.device  # accelerate sets up the processes (torchrun's) first
    init_distributed()
    world = dist.get_world_size()
    dp = world if args.unsharded else world // (args.tp * args.sp)

    corpus = Corpus(args)
    tokenizer = load_tokenizer(args, corpus, training_args.main_process_first)
    train_blocks = args.train_blocks or args.steps * args.grad_accum * args.batch_size * dp
    blocks = read_blocks(corpus, tokenizer, args.block_size, train_blocks + args.eval_blocks)
    train = Dataset.from_dict({"input_ids": blocks[:train_blocks], "labels": blocks[:train_blocks]})
    held_out = blocks[train_blocks:]
    evaluation = Dataset.from_dict({"input_ids": held_out, "labels": held_out}) if held_out else None

    model = build_model(args, tokenizer)
    if not args.unsharded:
        model = sf.shard_model(model, config=shard_config(args))  # shardformer
    trainer_class = Trainer if args.unsharded else ShardedTrainer  # shardformer
    trainer = trainer_class(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                            data_collator=default_data_collator, processing_class=tokenizer)

    resume = args.resume
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    metrics = trainer.evaluate() if evaluation is not None else {}
    trainer.save_model()
    trainer.save_state()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    summary = {"steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "eval_loss": metrics.get("eval_loss"),
               "optimizer": type(trainer.optimizer).__name__, "transformers": transformers.__version__,
               "model": os.path.abspath(args.output_dir)}
    if trainer.is_world_process_zero():
        print("finetune_hf_trainer: " + json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
