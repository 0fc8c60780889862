"""Checkpoints as plain HF directories (config.json, *.safetensors, index) from any layout.

`save_pretrained` all-gathers every split parameter over the tp group (`sharding.gather_full`
drops replicated pieces and vocabulary padding) and lets rank 0 write the full state dict with
the model's own `save_pretrained`, so the directory loads with `from_pretrained` and no
shardformer. With pipeline parallelism each stage's first rank (dp, sp and tp index 0) writes
its own stages' tensors to one safetensors file (a tied LM head is written once, as the input
embedding, as HF does) and rank 0 writes config.json, the generation config and one index
mapping every tensor to its file; no rank holds more than its stages. It succeeds on every rank or raises on every rank: rank 0 first checks that it can
write the directory, and the ranks agree on that and on the write itself (`comm.all_or_none`).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from ..comm import all_or_none
from ..sharding import full as whole_over_dp, gather_full, sharded_parameters


@torch.no_grad()
def full_state_dict(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict (a collective over the tp group, one tensor at a time).
    A rank with `keep=False` takes part in the gathers but keeps nothing (returns {})."""
    group = model.sf_mesh.get_group("tp")
    specs = {name: spec for name, _, spec in sharded_parameters(model)}
    full, done = {}, {}  # done: id(tensor) -> gathered, so tied weights stay one tensor
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in done:
            spec = specs.get(name)
            whole = whole_over_dp(tensor.detach())  # ZeRO-3: the whole tensor over dp first
            gathered = whole if spec is None else gather_full(whole, spec, group)
            done[id(tensor)] = gathered.cpu() if keep else None
        if keep:
            full[name] = done[id(tensor)]
    return full


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """Write the unsharded model as a plain HF directory (rank 0 writes; every rank must call).

    Extra keyword arguments go to the model's `save_pretrained` (e.g. `max_shard_size`). A
    failure on any rank (say rank 0 cannot create the directory) raises on every rank.
    """
    if not hasattr(model, "sf_mesh"):
        raise ValueError("sf.save_pretrained expects a model returned by sf.shard_model")
    if getattr(model, "sf_pipeline", None) is not None:
        if kwargs:
            raise ValueError(f"sf.save_pretrained of a pipelined model writes one file per stage; it takes no "
                             f"{', '.join(sorted(kwargs))}")
        return _save_stages(model, save_directory)
    writer = dist.get_rank() == 0
    with all_or_none(None, "sf.save_pretrained"):
        if writer:
            os.makedirs(save_directory, exist_ok=True)
    state = full_state_dict(model, keep=writer)  # only the writer holds the full model
    with all_or_none(None, "sf.save_pretrained"):
        if writer:
            model.save_pretrained(save_directory, state_dict=state, **kwargs)


def _save_stages(model: torch.nn.Module, directory) -> None:
    """The pipeline layout's writer (see module docstring)."""
    from safetensors.torch import save_file

    mesh, plan = model.sf_mesh, model.sf_pipeline.plan
    writer = all(mesh.get_local_rank(axis) == 0 for axis in ("dp", "sp", "tp"))
    stage_rank = mesh.get_local_rank("pp")
    with all_or_none(None, "sf.save_pretrained"):
        if writer:
            os.makedirs(directory, exist_ok=True)
        if dist.get_rank() == 0:  # weights of an earlier save would shadow or mix with these
            for old in os.listdir(directory):
                if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".safetensors.index.json")):
                    os.remove(os.path.join(directory, old))
    state = full_state_dict(model, keep=writer)
    if plan.tied:  # HF writes a tied head once, as the input embedding
        state.pop(plan.head_path + ".weight", None)
    name = f"model-{stage_rank + 1:05d}-of-{plan.pp:05d}.safetensors"
    files = [None] * dist.get_world_size()
    with all_or_none(None, "sf.save_pretrained"):
        if writer:
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, name),
                      metadata={"format": "pt"})
    dist.all_gather_object(files, (name, {k: v.numel() * v.element_size() for k, v in state.items()})
                           if writer else None)
    with all_or_none(None, "sf.save_pretrained"):
        if dist.get_rank() == 0:
            weight_map, total = {}, 0
            for entry in filter(None, files):
                for key, size in entry[1].items():
                    weight_map[key], total = entry[0], total + size
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(directory)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(directory)
