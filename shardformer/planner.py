"""The memory planner: per-rank memory of a layout, from the real sharded shapes, with no GPU and no
process group (`python -m shardformer.plan -c 65b --gpus 32 --tp 8 --pp 4 --zero 1 -b 8 -l 2048`).

For each pipeline stage the model is built on the meta device and sharded by `shard_model` as
that stage's first rank would shard it, under torch's in-process "fake" process group (its
collectives do nothing), so parameter counts are exactly the ones a real run holds (vocabulary
padding, replicated KV heads, pipeline cuts included). Per rank:
  * parameters: the local parameters in the training dtype (divided over dp at ZeRO-3);
  * gradients: the same in the training dtype (ZeRO-2/3: fp32 pieces over dp);
  * optimizer: fp32 master weights and AdamW's two fp32 states, as ZeRO pieces over dp x sp at
    stages 1-3 (each parameter's flat tensor rounded up to a multiple of the ranks);
  * activations (an estimate): per decoder layer and microbatch, 34 s b h bytes (Korthikanti et
    al., bf16, attention by SDPA without stored scores) divided by tp with sequence parallelism
    (by the sequence split otherwise only the tensor-parallel part, 24 of 34), or 2 s b h with
    gradient checkpointing plus one layer's full set; times the microbatches a stage holds (1F1B:
    pp - stage; GPipe: all).
`--search` lists the layouts of the given GPU count that fit (tp, pp, sp with all_to_all, ZeRO,
checkpointing), fastest-looking first (a crude score: pipeline bubble, tensor- and
sequence-parallel and ZeRO-3 communication, recomputation).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

CONFIGS = {  # LLaMA shapes
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=250),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=64, vocab_size=32000),
}
_UNITS = {"": 1, "B": 1, "KB": 2 ** 10, "MB": 2 ** 20, "GB": 2 ** 30, "TB": 2 ** 40}


def parse_bytes(text: str) -> int:
    """'80GB' -> bytes (binary units)."""
    t = text.strip().upper().replace("IB", "B")
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if u and t.endswith(u)), "")
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r}: expected a size such as 80GB") from None


def hf_config_of(name: str):
    """A transformers config from a preset name, a local path or a hub id."""
    from transformers import AutoConfig, LlamaConfig

    if name in CONFIGS:
        return LlamaConfig(**CONFIGS[name])
    try:
        return AutoConfig.from_pretrained(name)
    except Exception:  # noqa: BLE001 - one line for the user
        raise ValueError(f"-c/--config {name!r}: not one of {', '.join(CONFIGS)} and not a loadable config") from None


@dataclass
class StageMemory:
    stage: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def _local_parameters(hf_config, layout, world: int, rank: int) -> tuple[list[torch.Tensor], int]:
    """This rank's parameters (meta tensors) as a real run would shard them, and how many decoder
    layers it holds."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM

    from .api import shard_model

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        model = shard_model(model, config=layout)
        from .pipeline import AbsentLayer

        layers = model.get_submodule(model.sf_policy.layers if model.base_model is model
                                     else f"{model.base_model_prefix}.{model.sf_policy.layers}")
        held = sum(not isinstance(layer, AbsentLayer) for layer in layers)
        return list({id(p): p for p in model.parameters()}.values()), held
    finally:
        dist.destroy_process_group()
        from . import mesh  # its memos of groups belong to the world just destroyed

        mesh._MESHES.clear()
        mesh._SUBGROUPS.clear()


def stage_memory(hf_config, layout, world: int, batch: int, seq: int, dtype_bytes: int = 2) -> list[StageMemory]:
    """Per pipeline stage, the memory of its first rank (see module docstring). `batch`: the
    global batch in sequences (split over dp, then into microbatches)."""
    if world % layout.model_parallel_size:
        raise ValueError(f"--gpus {world} is not a multiple of tp x pp x sp = {layout.model_parallel_size}")
    dp = world // layout.model_parallel_size
    data = dp * layout.sp_size
    per_stage = world // layout.pp_size
    h = hf_config.hidden_size
    micro = layout.num_microbatches or layout.pp_size
    rows = max(1, batch // dp)
    mb_rows = max(1, rows // micro) if layout.pp_size > 1 else rows
    seq_local = seq // layout.sp_size if layout.sp_mode in ("all_to_all", "ring") else seq
    out = []
    for stage in range(layout.pp_size):
        params, n_layers = _local_parameters(hf_config, layout, world, stage * per_stage)
        numel = sum(p.numel() for p in params)
        pieces = sum(math.ceil(p.numel() / data) for p in params)
        zero = layout.zero_stage
        param_bytes = numel * dtype_bytes // (dp if zero == 3 else 1)
        grad_bytes = pieces * 4 if zero >= 2 else numel * dtype_bytes
        optim_bytes = (pieces if zero >= 1 else numel) * 12
        sbh = seq_local * mb_rows * h
        split = layout.tp_size if layout.sp_mode == "split_gather" else 1
        full_layer = sbh * (10 / split + 24 / layout.tp_size) * dtype_bytes / 2
        per_layer = 2 * sbh * dtype_bytes / split if layout.gradient_checkpointing else full_layer
        in_flight = micro if layout.pp_schedule == "gpipe" or layout.pp_size == 1 else max(1, layout.pp_size - stage)
        acts = int(per_layer * n_layers * in_flight + (full_layer if layout.gradient_checkpointing else 0))
        out.append(StageMemory(stage, param_bytes, grad_bytes, optim_bytes, acts))
    return out


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def report(name: str, stages: list[StageMemory], budget: int) -> tuple[bool, str]:
    """(fits, the printed table with the verdict and, if it does not fit, why)."""
    lines = [f"{name}: per rank (first rank of each pipeline stage)",
             f"  {'stage':>5} {'parameters':>13} {'gradients':>13} {'optimizer':>13} {'activations':>13} {'total':>13}"]
    for s in stages:
        lines.append(f"  {s.stage:>5} {gib(s.parameters):>13} {gib(s.gradients):>13} {gib(s.optimizer):>13} "
                     f"{gib(s.activations):>13} {gib(s.total):>13}")
    worst = max(stages, key=lambda s: s.total)
    fits = worst.total <= budget
    if fits:
        lines.append(f"  fits: the most loaded rank needs {gib(worst.total)} of {gib(budget)}")
    else:
        parts = {"parameters": worst.parameters, "gradients": worst.gradients, "optimizer state": worst.optimizer,
                 "activations": worst.activations}
        big = max(parts, key=parts.get)
        lines.append(f"  does not fit: stage {worst.stage} needs {gib(worst.total)} of {gib(budget)}; the largest part "
                     f"is {big} ({gib(parts[big])})")
    return fits, "\n".join(lines)


def _layout(tp, pp, sp, sp_mode, zero, micro, schedule, checkpointing):
    from .config import ShardConfig

    return ShardConfig(tp_size=tp, pp_size=pp, sp_size=sp, sp_mode=sp_mode, zero_stage=zero,
                       num_microbatches=micro if pp > 1 else None, pp_schedule=schedule if pp > 1 else "1f1b",
                       gradient_checkpointing=checkpointing, enable_fused_kernels=False)


def search(hf_config, gpus: int, batch: int, seq: int, budget: int, top: int = 5) -> list[tuple[float, str, object]]:
    """Layouts of `gpus` ranks that fit, fastest-looking first: tp (with split_gather), pp (1f1b,
    2 pp microbatches), sp on its own axis (all_to_all, also with pp), ZeRO 1-3,
    gradient checkpointing on or off."""
    found = []
    heads = hf_config.num_attention_heads
    for tp in (t for t in (1, 2, 4, 8) if gpus % t == 0 and heads % t == 0):
        for sp in (s for s in (1, 2, 4, 8) if gpus % (tp * s) == 0 and heads % (tp * s) == 0):
            for pp in (p for p in (1, 2, 4, 8, 16) if gpus % (tp * sp * p) == 0 and p <= hf_config.num_hidden_layers):
                for zero in (1, 2, 3):
                    for checkpointing in (False, True):
                        found.extend(_candidate(hf_config, gpus, batch, seq, budget, tp, sp, pp, zero, checkpointing))
    return sorted(found, key=lambda f: f[0])[:top]


def _candidate(hf_config, gpus, batch, seq, budget, tp, sp, pp, zero, checkpointing) -> list:
    """[(score, name, layout)] for one layout if it can be set up and fits, else []. The score is
    crude: the pipeline bubble, recomputation, tp's and sp's collectives, ZeRO-3's all-gathers."""
    micro = 2 * pp if pp > 1 else None
    sp_mode = "all_to_all" if sp > 1 else "split_gather" if tp > 1 else None
    layout = _layout(tp, pp, sp, sp_mode, zero, micro, "1f1b", checkpointing)
    try:
        stages = stage_memory(hf_config, layout, gpus, batch, seq)
    except ValueError:
        return []
    if max(s.total for s in stages) > budget:
        return []
    bubble = (pp - 1) / (micro + pp - 1) if pp > 1 else 0.0
    score = (1 + bubble) * (1.33 if checkpointing else 1.0) * (1 + 0.06 * math.log2(tp)) * \
        (1 + 0.05 * math.log2(sp)) * (1.1 if zero == 3 else 1.0)
    name = f"tp {tp} x " + (f"sp {sp} (all_to_all) x " if sp > 1 else "") + \
        f"pp {pp} x dp {gpus // (tp * sp * pp)}, zero {zero}" + (", checkpointing" if checkpointing else "")
    return [(score, name, layout)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardformer.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="7b", help=f"{' | '.join(CONFIGS)} | a path or HF model id")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--sp-mode", default=None)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=None)
    parser.add_argument("--pp-schedule", default="1f1b")
    parser.add_argument("-b", "--batch", type=int, default=8, help="global batch in sequences")
    parser.add_argument("-l", "--seq", type=int, default=2048)
    parser.add_argument("-g", "--grad-checkpoint", action="store_true")
    parser.add_argument("--gpu-memory", default="80GB")
    parser.add_argument("--search", action="store_true")
    args = parser.parse_args(argv)
    try:
        hf_config = hf_config_of(args.config)
        budget = parse_bytes(args.gpu_memory)
        if args.search:
            found = search(hf_config, args.gpus, args.batch, args.seq, budget)
            print(f"layouts of {args.gpus} GPUs that fit {args.gpu_memory} (fastest-looking first):" if found else
                  f"no layout of {args.gpus} GPUs fits {args.gpu_memory}")
            for _, name, _ in found:
                print(f"  {name}")
            return 0
        sp_mode = args.sp_mode or ("split_gather" if args.tp > 1 and args.sp == 1 else None)
        layout = _layout(args.tp, args.pp, args.sp, sp_mode if args.sp > 1 or args.tp > 1 else None, args.zero,
                         args.microbatches, args.pp_schedule, args.grad_checkpoint)
        stages = stage_memory(hf_config, layout, args.gpus, args.batch, args.seq)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _, text = report(f"{args.config} on {args.gpus} GPUs, tp {args.tp} x pp {args.pp} x sp {args.sp}, "
                     f"zero {args.zero}, batch {args.batch} x {args.seq}", stages, budget)
    print(text)
    return 0
