"""Checkpoints as plain HF directories (config.json, *.safetensors, index) from any layout.

`save_pretrained` all-gathers every split parameter over the tp group, drops replicated pieces
and vocabulary padding, and lets rank 0 write the full state dict with the model's own
`save_pretrained`, so the directory loads with `from_pretrained` and no shardformer.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .layers.comm import gather_from_group
from .layers.shard import merge_pieces, sharded_parameters


@torch.no_grad()
def gather_full(tensor: torch.Tensor, spec, group) -> torch.Tensor:
    """The unsharded tensor from this rank's piece (a collective over `group`, the tp group)."""
    if spec is None:
        return tensor.detach()
    stacked = gather_from_group(tensor.detach().contiguous(), 0, group)
    return merge_pieces(list(stacked.chunk(dist.get_world_size(group), dim=0)), spec)


@torch.no_grad()
def full_state_dict(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict (a collective over the tp group, one tensor at a time).
    A rank with `keep=False` takes part in the gathers but keeps nothing (returns {})."""
    group = model.sf_mesh.get_group("tp")
    specs = {name: spec for name, _, spec in sharded_parameters(model)}
    full, done = {}, {}  # done: id(tensor) -> gathered, so tied weights stay one tensor
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in done:
            gathered = gather_full(tensor, specs.get(name), group)
            done[id(tensor)] = gathered.cpu() if keep else None
        if keep:
            full[name] = done[id(tensor)]
    return full


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """Write the unsharded model as a plain HF directory (rank 0 writes; every rank must call).

    Extra keyword arguments go to the model's `save_pretrained` (e.g. `max_shard_size`).
    """
    if not hasattr(model, "sf_mesh"):
        raise ValueError("sf.save_pretrained expects a model returned by sf.shard_model")
    state = full_state_dict(model, keep=dist.get_rank() == 0)  # only the writer holds the full model
    if dist.get_rank() == 0:
        model.save_pretrained(save_directory, state_dict=state, **kwargs)
    dist.barrier()
