"""The process mesh: a `DeviceMesh` over the `torch.distributed` world with axes (pp, dp, sp, tp),
and the groups derived from it.

tp is the innermost (fastest-varying) axis so that tensor-parallel peers are neighbouring ranks,
i.e. on the same machine under torchrun; pp is the outermost, so the pipeline's point-to-point
traffic (and dp's) is what crosses machines. No global state: the mesh and its groups are returned
and travel with the sharded model (`model.sf_mesh`, `model.sf_groups`). Only `MESH_AXES` knows
the axis order; everything else indexes axes by name.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ShardConfig

MESH_AXES = ("pp", "dp", "sp", "tp")

_LAUNCH_HINT = (
    "launch with torchrun, e.g. `torchrun --nproc_per_node 2 train.py`, and call "
    "torch.distributed.init_process_group() (backend 'nccl' on GPUs, 'gloo' on CPUs) before sharding"
)


def require_process_group() -> int:
    """Return the world size, or raise ValueError saying how to launch when there is no process
    group. On NCCL, pick this process's GPU from LOCAL_RANK when CUDA is not initialised yet (as
    DeviceMesh would), before shardformer's first collective runs on the current device."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"shard_model needs an initialized torch.distributed process group: {_LAUNCH_HINT}")
    if ("nccl" in str(dist.get_backend()) and torch.cuda.is_available() and not torch.cuda.is_initialized()
            and "LOCAL_RANK" in os.environ):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
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


# Process groups are resources of the process (each holds connections and threads); sharding a
# second model with the same layout reuses them instead of creating them again. Keyed by the
# default process group too, so a re-initialised world starts afresh. The mesh itself is still
# an object passed explicitly (model.sf_mesh); these are only memos of what was created.
_MESHES: dict = {}
_SUBGROUPS: dict = {}


def build_mesh(config: ShardConfig) -> DeviceMesh:
    """A DeviceMesh of shape (pp, dp, sp, tp) over the current world (created once per shape)."""
    world = require_process_group()
    dp = check_world(config, world)
    sizes = {"pp": config.pp_size, "dp": dp, "sp": config.sp_size, "tp": config.tp_size}
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    key = (id(dist.group.WORLD), device_type(), shape)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type(), shape, mesh_dim_names=MESH_AXES)
    return _MESHES[key]


def axis_rows(mesh: DeviceMesh, axes: tuple[str, ...]) -> list[list[int]]:
    """The global ranks of the mesh as rows: ranks in one row differ only along `axes`."""
    names = list(mesh.mesh_dim_names)
    order = [i for i, n in enumerate(names) if n not in axes] + [names.index(a) for a in axes]
    width = 1
    for a in axes:
        width *= mesh.size(names.index(a))
    return mesh.mesh.permute(order).reshape(-1, width).tolist()


def new_subgroups(rows: list[list[int]], timeout_s: float | None = None):
    """This rank's group among `rows` (None when it is in none); a collective the first time:
    every rank calls it with the same rows. `timeout_s`: how long an operation of the group may
    wait (default: the process group's)."""
    key = (id(dist.group.WORLD), tuple(tuple(row) for row in rows), timeout_s)
    if key not in _SUBGROUPS:
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        _SUBGROUPS[key], _ = dist.new_subgroups_by_enumeration(rows, timeout=timeout)
    return _SUBGROUPS[key]


@dataclass
class ParallelGroups:
    """The groups one sharded model uses, all created when it is sharded (collectives).

    replica: the model-parallel peers of this rank (axes pp, sp, tp): the ranks holding one
        model replica, which must all receive the same batch; `replica_ranks` lists them and
        `replica_rows` lists the ranks of every replica.
    blocks: {n: this rank's group of n consecutive tp ranks} for the replica sizes of
        parameters replicated inside the tp group (`ShardSpec.replicas`).
    data: the ranks over which gradients are averaged: dp x sp (sequence-parallel ranks see
        different tokens of one batch, like data-parallel ranks see different batches; their
        gradients are carried scaled by sp so that the mean is the sum over sp).
    pp / tied: the pipeline's groups (see `build_groups`); None without pipeline parallelism.
    """

    mesh: DeviceMesh
    replica: object
    replica_ranks: list[int]
    replica_rows: list[list[int]]
    blocks: dict[int, object] = field(default_factory=dict)
    data: object = None
    pp: object = None  # the pp axis with the pipeline's timeout (group rank = pp index)
    tied: object = None  # this rank's pair of pp ranks holding tied embeddings (first, last stage)

    @property
    def tp(self):
        return self.mesh.get_group("tp")

    @property
    def dp(self):
        return self.mesh.get_group("dp")

    @property
    def sp(self):
        return self.mesh.get_group("sp")

    def size(self, axis: str) -> int:
        return self.mesh.size(list(self.mesh.mesh_dim_names).index(axis))

    @property
    def data_size(self) -> int:
        """Ranks holding identical (reduced) gradients of every parameter: dp x sp."""
        return self.size("dp") * self.size("sp")

    def block(self, replicas: int):
        """The group of `replicas` consecutive tp ranks holding the same piece as this rank."""
        return self.tp if replicas == self.size("tp") else self.blocks[replicas]


def build_groups(mesh: DeviceMesh, block_sizes=(), pp_timeout_s: float | None = None,
                 tied_pp_ranks: tuple[int, int] | None = None) -> ParallelGroups:
    """The derived groups of `mesh` (see `ParallelGroups`); `block_sizes`: replica counts of
    parameters replicated inside tp; `pp_timeout_s`: with pp > 1, how long a pipeline stage
    waits for its neighbour; `tied_pp_ranks`: the pp indices of the first and last stage when
    they hold tied embeddings. Every rank must call it with the same arguments."""
    replica_rows = axis_rows(mesh, ("pp", "sp", "tp"))
    me = dist.get_rank()
    mine = next(row for row in replica_rows if me in row)
    sizes = {axis: mesh.size(i) for i, axis in enumerate(mesh.mesh_dim_names)}
    if sizes["pp"] * sizes["sp"] == 1:  # the replica is the tp group: no new group
        replica = mesh.get_group("tp")
    elif sizes["pp"] * sizes["tp"] == 1:
        replica = mesh.get_group("sp")
    else:
        replica = new_subgroups(replica_rows)
    groups = ParallelGroups(mesh, replica, mine, replica_rows)
    if sizes["sp"] == 1 or sizes["dp"] == 1:
        groups.data = groups.dp if sizes["sp"] == 1 else groups.sp
    else:
        groups.data = new_subgroups(axis_rows(mesh, ("dp", "sp")))
    if sizes["pp"] > 1:
        pp_rows = axis_rows(mesh, ("pp",))
        groups.pp = new_subgroups(pp_rows, pp_timeout_s)
        if tied_pp_ranks is not None and tied_pp_ranks[0] != tied_pp_ranks[1]:
            groups.tied = new_subgroups([[row[i] for i in tied_pp_ranks] for row in pp_rows])
    tp = groups.size("tp")
    for n in sorted(set(block_sizes)):
        if 1 < n < tp:
            tp_rows = axis_rows(mesh, ("tp",))
            groups.blocks[n] = new_subgroups([row[i:i + n] for row in tp_rows for i in range(0, tp, n)])
    return groups
