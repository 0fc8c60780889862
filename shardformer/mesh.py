"""The process mesh: a `DeviceMesh` over the `torch.distributed` world with axes (dp, pp, sp, tp).

tp is the innermost (fastest-varying) axis so that tensor-parallel peers are neighbouring ranks,
i.e. on the same machine under torchrun. No global state: the mesh is returned and travels with
the sharded model (`model.sf_mesh`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ShardConfig

MESH_AXES = ("dp", "pp", "sp", "tp")

_LAUNCH_HINT = (
    "launch with torchrun, e.g. `torchrun --nproc_per_node 2 train.py`, and call "
    "torch.distributed.init_process_group() (backend 'nccl' on GPUs, 'gloo' on CPUs) before sharding"
)


def require_process_group() -> int:
    """Return the world size, or raise ValueError saying how to launch when there is no process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"shard_model needs an initialized torch.distributed process group: {_LAUNCH_HINT}")
    return dist.get_world_size()


def check_world(config: ShardConfig, world_size: int) -> int:
    """Validate that the model-parallel degrees fit the world; return the data-parallel degree."""
    if config.tp_size > world_size or world_size % config.tp_size:
        raise ValueError(
            f"ShardConfig.tp_size={config.tp_size} must divide the world size "
            f"(torch.distributed.get_world_size()={world_size})"
        )
    mp = config.model_parallel_size
    if world_size % mp:
        raise ValueError(
            f"ShardConfig.pp_size*sp_size*tp_size={mp} must divide the world size "
            f"(torch.distributed.get_world_size()={world_size})"
        )
    return world_size // mp


def device_type() -> str:
    """'cuda' when the process group runs NCCL on GPUs, else 'cpu'."""
    backend = dist.get_backend()
    return "cuda" if "nccl" in str(backend) and torch.cuda.is_available() else "cpu"


def build_mesh(config: ShardConfig) -> DeviceMesh:
    """A DeviceMesh of shape (dp, pp, sp, tp) over the current world."""
    world = require_process_group()
    dp = check_world(config, world)
    shape = (dp, config.pp_size, config.sp_size, config.tp_size)
    return init_device_mesh(device_type(), shape, mesh_dim_names=MESH_AXES)


def axis_group(mesh: DeviceMesh, axis: str):
    """The process group of this rank along one mesh axis."""
    return mesh.get_group(axis)
