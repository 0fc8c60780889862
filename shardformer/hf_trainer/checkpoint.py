"""A Trainer checkpoint of a sharded model: the weights as a plain HF directory, the optimizer per rank.

A `checkpoint-<step>/` directory of `ShardedTrainer` holds what the stock Trainer writes there
(the model as an HF directory, here written by `sf.save_pretrained` from every rank;
`scheduler.pt`, `rng_state_<rank>.pth`, `trainer_state.json`, the training arguments) except
`optimizer.pt`: a sharded model's optimizer state differs on every rank (tensor-parallel shards,
`sf.ZeroOptimizer`'s pieces and master weights), so every rank writes its own
`sf_optimizer-rank<r>-of-<world>.pt` (its optimizer's `state_dict()` and the layout it was saved
on). Resuming needs the same layout (a ValueError on every rank otherwise). The weights are read
back from the HF files into the sharded model in place, each rank reading only its slices
(`sf.load_pretrained`'s reader): exact, since the saved tensors are the shards put together.
Every function here succeeds on every rank or raises on every rank.
"""
from __future__ import annotations

import glob
import os

import torch
import torch.distributed as dist

from ..checkpoint.load import load_weights as _load_weights
from ..comm import all_or_none

_OPTIMIZER = "sf_optimizer-rank{rank:05d}-of-{world:05d}.pt"


def optimizer_file(directory: str) -> str:
    """This rank's optimizer file in a checkpoint directory."""
    return os.path.join(directory, _OPTIMIZER.format(rank=dist.get_rank(), world=dist.get_world_size()))


def _layout(model) -> dict:
    return {"world": dist.get_world_size(), "config": repr(model.sf_config)}


def save_optimizer(optimizer, model, directory: str) -> None:
    """Every rank writes its optimizer's state (see module docstring)."""
    with all_or_none(None, "ShardedTrainer: saving the optimizer state"):
        os.makedirs(directory, exist_ok=True)
        torch.save({"optimizer": optimizer.state_dict(), "layout": _layout(model)}, optimizer_file(directory))


def load_optimizer(optimizer, model, directory: str) -> bool:
    """Restore every rank's optimizer state from `directory`; False (on every rank) when the
    checkpoint holds none (saved with `save_only_model`), as the stock Trainer skips it then."""
    if not glob.glob(os.path.join(directory, "sf_optimizer-rank*.pt")):
        return False
    with all_or_none(None, "ShardedTrainer: resuming the optimizer state"):
        path = optimizer_file(directory)
        if not os.path.isfile(path):
            raise ValueError(f"ShardedTrainer: {directory} holds no optimizer state for rank {dist.get_rank()} of "
                             f"{dist.get_world_size()} ({os.path.basename(path)}): it was saved on another layout; "
                             "resume with the processes and ShardConfig it was saved with")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["layout"] != _layout(model):
            raise ValueError(f"ShardedTrainer: the optimizer state in {directory} was saved on another layout "
                             f"({payload['layout']}); this run is {_layout(model)}")
        optimizer.load_state_dict(payload["optimizer"])
    return True


@torch.no_grad()
def load_weights(model, directory: str) -> None:
    """Fill the sharded `model` in place from the HF checkpoint in `directory` (each rank reads
    only its slices)."""
    with all_or_none(None, f"ShardedTrainer: loading the weights of {directory}"):
        _load_weights(model, directory)
