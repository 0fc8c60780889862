"""The command line of `examples/pretrain.py` and every check that can run before a process starts.

Each check raises `UsageError` (a `ValueError` whose text begins with the flag it is about);
`pretrain.py` prints it as one line and exits with status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os

from shardformer.planner import CONFIGS

# LLaMA shapes; vocab_size comes from the tokenizer. `tiny` trains in about a minute on 2 CPU cores.
PRESETS = dict(CONFIGS, tiny=dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2))
PRESET_DEFAULTS = {  # sequence length, batch per data-parallel rank, peak learning rate, BPE vocabulary, steps
    "tiny": dict(seq_len=128, batch_size=8, lr=2e-3, vocab_size=2048, steps=200),
}
LARGE_DEFAULTS = dict(seq_len=2048, batch_size=8, lr=3e-4, vocab_size=32000, steps=5000)
# --plugin: the reference recipe's names; explicit --tp/--pp/--sp/--zero override them
PLUGINS = {
    "tp": dict(zero=0),                       # tensor parallel over one node's processes (/ pp x sp): the default
    "ddp": dict(tp=1, pp=1, zero=0),          # plain data parallel
    "zero2": dict(tp=1, pp=1, zero=2),        # data parallel, gradients and optimizer state sharded
    "gemini": dict(tp=1, pp=1, zero=3, offload=True),  # weights sharded too, offloaded to CPU memory
    "3d": dict(tp=1, pp=1, zero=1),           # tp x pp (set --tp and --pp) x ZeRO-1 over the rest
}
SAVE_MARKER = "run.json"  # what a --save-dir holds once a run has started in it


class UsageError(ValueError):
    """A bad flag: the text names it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain.py", description="Pretrain a causal LM with shardformer (see the module docstring).")
    a = p.add_argument
    a("-c", "--config", default="tiny",
      help=f"model: {' | '.join(PRESETS)} (LLaMA shapes, random init), or a path / HF model id (a config, or a "
           "checkpoint whose weights are loaded)")
    a("--plugin", choices=tuple(PLUGINS), default="tp",
      help="tp: tensor parallel over one node's processes (default); ddp; zero2; gemini: ZeRO-3 with CPU offload; "
           "3d: --tp x --pp x ZeRO-1")
    a("--tp", type=int, help="tensor-parallel size (overrides --plugin)")
    a("--pp", type=int, help="pipeline-parallel size (overrides --plugin)")
    a("--sp", type=int, help="sequence-parallel size for --sp-mode all_to_all / ring")
    a("--sp-mode", choices=("split_gather", "all_to_all", "ring"),
      help="sequence parallelism (split_gather runs on the tp group; default all_to_all when --sp > 1)")
    a("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (overrides --plugin)")
    a("--microbatches", type=int, help="pipeline microbatches (default: --pp)")
    a("--pp-schedule", choices=("gpipe", "1f1b", "interleaved", "zbv"), default="1f1b")
    a("-l", "--seq-len", type=int, help="tokens per sequence (default 128 for tiny, else 2048)")
    a("-b", "--batch-size", type=int, help="sequences per data-parallel rank and step (default 8)")
    a("-g", "--grad-checkpoint", action="store_true", help="gradient checkpointing")
    a("-a", "--flash-attn", action="store_true",
      help="flash attention (flash-attn when installed, else SDPA, which picks its flash kernel on GPUs)")
    a("-d", "--dataset", help="an HF dataset name, or local .txt / .jsonl / .json files, folders or globs "
                              "(default: this Python's standard library source, which every machine has)")
    a("--dataset-config", help="the HF dataset's configuration name")
    a("--text-field", default="text", help="the text column of the dataset / JSONL records")
    a("--tokenizer", help="an HF tokenizer path or id (default: the --config checkpoint's, else a byte-level BPE "
                          "trained on the data on first use and cached)")
    a("--vocab-size", type=int, help="vocabulary of the trained BPE (default 2048 for tiny, else 32000)")
    a("--steps", type=int, help="optimizer steps in all, a resumed run's included (default 200 for tiny, else 5000)")
    a("--lr", type=float, help="peak learning rate (default 2e-3 for tiny, else 3e-4)")
    a("--warmup", type=int, help="linear warmup steps, then a cosine decay to --min-lr-ratio (default steps / 10)")
    a("--min-lr-ratio", type=float, default=0.1)
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    a("--save-dir", default="runs/pretrain",
      help="log.jsonl, loss.png, checkpoints/ and the final HF checkpoint model/ go here")
    a("--save-every", type=int, default=100, help="steps between resumable checkpoints (0: only the final model)")
    a("--keep", type=int, default=2, help="resumable checkpoints kept (the newest; older ones are removed)")
    a("--resume", nargs="?", const="", default=None, metavar="DIR",
      help="continue the run saved in DIR (default: --save-dir)")
    a("--seed", type=int, default=42)
    a("--sample-tokens", type=int, default=48, help="tokens generated from the final checkpoint (0: none)")
    a("--prompt", default="def ", help="the sample's prompt")
    a("--peak-tflops", type=float, help="peak TFLOP/s of one device for MFU (default 989 on CUDA, none on CPU)")
    a("--nproc", type=int, help="processes on this machine (default: its GPUs, or 2 without)")
    a("--nnodes", type=int, default=1)
    a("--node-rank", type=int, default=0)
    a("--master-addr", default="127.0.0.1")
    a("--master-port", type=int, help="default: a free port on one node, 29500 on several")
    return p


def _positive(args, names) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < 1:
            raise UsageError(f"--{name} {value}: must be at least 1")


def preset_defaults(config: str) -> dict:
    return PRESET_DEFAULTS.get(config, LARGE_DEFAULTS)


def finish_defaults(args) -> None:
    """Fill the defaults that depend on the --config preset."""
    defaults = preset_defaults(args.config)
    for name in ("seq_len", "batch_size", "lr", "vocab_size", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.resume == "":
        args.resume = args.save_dir


def layout(args, world: int, nproc: int) -> dict:
    """ShardConfig keyword arguments from --plugin and the explicit flags; UsageError when they do
    not fit the world."""
    plugin = PLUGINS[args.plugin]
    pp = args.pp if args.pp is not None else plugin.get("pp", 1)
    zero = args.zero if args.zero is not None else plugin["zero"]
    sp = args.sp if args.sp is not None else 1
    tp = args.tp if args.tp is not None else plugin.get("tp", max(1, nproc // (pp * sp)))  # tp: what one node has left
    mode = args.sp_mode or ("all_to_all" if sp > 1 else None)
    if mode == "split_gather" and sp != 1:
        raise UsageError(f"--sp {sp} with --sp-mode split_gather: split_gather runs on the tp group; leave --sp out")
    if mode in ("all_to_all", "ring") and sp < 2:
        raise UsageError(f"--sp-mode {mode} needs --sp 2 or more")
    if world % (tp * pp * sp):
        raise UsageError(f"--tp {tp} x --pp {pp} x --sp {sp} = {tp * pp * sp} does not divide the {world} processes "
                         f"(--nproc {nproc} x --nnodes {world // nproc})")
    kwargs = dict(tp_size=tp, pp_size=pp, sp_size=sp, zero_stage=zero, gradient_checkpointing=args.grad_checkpoint,
                  cpu_offload=bool(plugin.get("offload")) and zero == 3)
    if mode is not None:
        kwargs["sp_mode"] = mode
    if pp > 1:
        kwargs.update(pp_schedule=args.pp_schedule, num_microbatches=args.microbatches or pp)
        if args.batch_size % kwargs["num_microbatches"]:
            raise UsageError(f"-b/--batch-size {args.batch_size} does not divide into --microbatches "
                             f"{kwargs['num_microbatches']} (default: --pp)")
    elif args.microbatches is not None:
        raise UsageError("--microbatches needs --pp 2 or more")
    try:
        from shardformer import ShardConfig

        ShardConfig(**kwargs)
    except ValueError as e:
        raise UsageError(f"layout flags (--plugin {args.plugin}, --tp/--pp/--sp/--sp-mode/--zero): {e}") from None
    return kwargs


def is_local(dataset: str) -> bool:
    return os.path.exists(dataset) or any(c in dataset for c in "*?") or dataset.startswith((".", "/", "~")) or \
        dataset.endswith((".txt", ".json", ".jsonl"))


def model_config(args):
    """The transformers config --config names (vocab_size still to be set for presets)."""
    from transformers import AutoConfig, LlamaConfig

    import shardformer as sf

    if args.config in PRESETS:
        return LlamaConfig(**PRESETS[args.config], tie_word_embeddings=False)
    try:
        config = AutoConfig.from_pretrained(args.config)
    except Exception as e:  # noqa: BLE001 - reported as one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--config {args.config!r}: not one of {', '.join(PRESETS)} and not a loadable config "
                         f"path or model id ({reason})") from None
    supported = sf.policies.supported_model_types()
    causal = [a for a in (config.architectures or []) if a.endswith("ForCausalLM")]
    if config.model_type not in supported or (config.architectures and not causal):
        arch = ", ".join(config.architectures or []) or f"{config.model_type} model"
        raise UsageError(f"--config {args.config!r} describes a {arch} (model_type {config.model_type!r}); this "
                         f"job pretrains causal LMs of the families {', '.join(supported)}")
    return config


def has_weights(path: str) -> bool:
    """Whether --config's directory holds weights to load (safetensors; UsageError for .bin only)."""
    if any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        return True
    if any(os.path.exists(os.path.join(path, f)) for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise UsageError(f"--config {path!r} holds pytorch_model.bin weights; sf.load_pretrained reads safetensors: "
                         "convert them once with from_pretrained(...).save_pretrained(dir)")
    return False


def _describe(config) -> dict:
    """What must match for a checkpoint to continue: the model's shape."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return {k: getattr(config, k, None) for k in keys}


def check_save_dir(args) -> None:
    """UsageError when --save-dir holds a run and --resume is not given, or --resume names no
    committed checkpoint (cheap: run before anything is built)."""
    from shardformer.checkpoint.resume import latest_checkpoint

    if args.resume is None:  # a run that failed before its first checkpoint left nothing worth keeping
        if latest_checkpoint(os.path.join(args.save_dir, "checkpoints")) is not None or \
                os.path.exists(os.path.join(args.save_dir, "model")):
            raise UsageError(f"--save-dir {args.save_dir!r} already holds a run: pass --resume to continue it, or "
                             "choose another --save-dir")
        return
    if os.path.abspath(args.resume) != os.path.abspath(args.save_dir):
        raise UsageError(f"--resume {args.resume!r}: a run continues in its own directory; pass --save-dir "
                         f"{args.resume!r} too (or --resume alone)")
    if latest_checkpoint(os.path.join(args.resume, "checkpoints")) is None:
        raise UsageError(f"--resume {args.resume!r}: no committed checkpoint there (nothing to resume)")


def run_record(args, config, shard_kwargs: dict, world: int) -> dict:
    """What --save-dir records of this run; with --resume, UsageError when the saved run is of
    another model or layout."""
    check_save_dir(args)
    layout_record = {k: v for k, v in shard_kwargs.items() if k != "gradient_checkpointing"}  # -g may change
    record = {"model": _describe(config), "layout": dict(layout_record, world=world, dtype=args.dtype),
              "config": args.config}
    if args.resume is None:
        return record
    try:
        with open(os.path.join(args.resume, SAVE_MARKER)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"--resume {args.resume!r}: {SAVE_MARKER} is missing or unreadable; not a run of this "
                         "script") from None
    for part, flags in (("model", "--config / --vocab-size / --tokenizer"), ("layout", "the layout flags and --dtype")):
        theirs, ours = saved.get(part) or {}, record[part]
        diff = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)}
        if diff:
            raise UsageError(f"--resume {args.resume!r} holds a run of another {part} (saved, now: {diff}); check "
                             f"{flags}")
    return record


def parse(argv=None):
    args = build_parser().parse_args(argv)
    _positive(args, ("tp", "pp", "sp", "microbatches", "seq-len", "batch-size", "steps", "vocab-size", "nproc",
                     "nnodes", "keep"))
    if args.save_every < 0:
        raise UsageError(f"--save-every {args.save_every}: must be 0 or more")
    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank}: must be in [0, --nnodes {args.nnodes})")
    finish_defaults(args)
    return args
