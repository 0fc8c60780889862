"""`init_model`: a model from its config alone, created directly as this rank's shards.

Built on the meta device and sharded (`load.sharded_on_meta`), then each local parameter is
filled from its full tensor, generated one tensor at a time from a generator seeded by (seed,
parameter name) with the family's initialisation rule (HF's: normal(0, initializer_range) for
linear and embedding weights, the embedding's padding row zero, ones for norm weights, zeros
for biases; a tied LM head is the embedding, also on a pipeline stage that holds only the head)
and cut to this rank's piece: its tensor-parallel piece (`split_tensor`) and, with
`ShardConfig(zero_stage=3)`, that piece's dp (or dp x sp) chunk along its first dimension,
written into the FSDP2 parameter's `to_local()` (`zero3.local_region`; the model is
materialised with FSDP2's `to_empty`). So the same seed gives the same full weights whatever
the layout, and no rank ever holds more than its shard plus one full tensor.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from ..data_parallel.zero3 import local_region
from ..sharding import local, sharded_parameters, split_tensor
from .load import init_buffers, materialize_sharded, sharded_on_meta


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def _owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    return {id(p): (m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)}


def _embedding_names(model: nn.Module) -> tuple[str, str]:
    """The HF names of the input embedding and LM head weights (also on a pipeline rank that
    holds only one of them)."""
    runner = getattr(model, "sf_pipeline", None)
    if runner is not None:
        return runner.plan.embedding_path + ".weight", runner.plan.head_path + ".weight"
    paths = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (paths[id(model.get_input_embeddings())] + ".weight",
            paths[id(head)] + ".weight" if head is not None else "")


def _full_value(module: nn.Module, attr: str, shape, std: float, gen: torch.Generator) -> torch.Tensor:
    kind = type(module).__name__
    if attr == "bias":
        return torch.zeros(shape)
    if "Norm" in kind:
        return torch.ones(shape)
    if isinstance(module, (nn.Linear, nn.Embedding)) or kind in ("ColumnParallelLinear", "RowParallelLinear",
                                                                 "VocabParallelLMHead") \
            or kind.lower().endswith(("experts", "topkrouter")):  # MoE experts, routers (Mixtral's TopKRouter,
        return torch.empty(shape).normal_(0.0, std, generator=gen)  # GLM-4.5's TopkRouter): normal(0, std), as HF
    raise ValueError(f"sf.init_model cannot initialise {kind}.{attr} independently of the layout; build the model "
                     "whole and call shard_model")


@torch.no_grad()
def init_model(hf_config, config=None, policy=None, seed: int = 0, dtype: torch.dtype | None = None, device=None):
    """A model of `hf_config` (a transformers config) sharded by `config`, initialised as shards
    (see module docstring). Every rank must call it with the same arguments."""
    from .load import _model_class

    model = sharded_on_meta(_model_class(hf_config), hf_config, config, policy, dtype)
    materialize_sharded(model, device)
    owners = _owners(model)
    std = getattr(hf_config, "initializer_range", 0.02)
    tp_rank = model.sf_mesh.get_local_rank("tp")
    embedding, head = _embedding_names(model)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    for name, param, spec in sharded_parameters(model):
        module, attr = owners[id(param)]
        shape = list(param.shape)
        if spec.split:
            shape[spec.dim] = spec.full
        if name == embedding or (tied and name == head):  # a tied head is the embedding, on every stage
            full = torch.empty(shape).normal_(0.0, std, generator=_generator(seed, embedding))
            if getattr(hf_config, "pad_token_id", None) is not None:
                full[hf_config.pad_token_id] = 0
        else:
            full = _full_value(module, attr, shape, std, _generator(seed, name))
        piece = split_tensor(full.to(getattr(model, "sf_param_dtype", param.dtype)), spec, tp_rank)  # its tp piece
        held = tuple(slice(start, start + n) for start, n in local_region(param))  # ZeRO-3: its dp chunk
        local(param).copy_(piece[held])
    init_buffers(model, persistent=True)
    dist.barrier()
    return model
