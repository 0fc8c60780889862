"""Autograd-aware collectives over one process group, built on functional collectives.

Each op is a `torch.autograd.Function` whose forward and backward call
`torch.distributed._functional_collectives`, so `torch.compile` traces them as collectives rather
than graph-breaking on c10d calls. A group of size 1 makes every op the identity.

    op                 forward                    backward
    copy_to_group      identity                   all-reduce (sum)
    reduce_from_group  all-reduce (sum)           identity
    gather_from_group  all-gather, concat on dim  keep this rank's slice of dim
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

# Newer torch names it all_gather_single (all_gather_tensor is deprecated); same semantics.
_all_gather_dim0 = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


def _all_reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    return fc.wait_tensor(fc.all_reduce(x.contiguous(), op, group))


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    stacked = fc.wait_tensor(_all_gather_dim0(x.contiguous(), 0, group))
    if dim % x.dim() == 0:
        return stacked
    return torch.cat(stacked.chunk(world, dim=0), dim=dim)


def _local_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(world, dim=dim)[rank].contiguous()


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(grad, ctx.dim, ctx.group), None, None


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; gradients summed over `group` in backward (input of a column-parallel op)."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results over `group` in forward; identity backward (output of a row-parallel op)."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate equal shards along `dim` in forward; keep the local shard's gradient in backward."""
    return x if group_size(group) == 1 else _GatherFromGroup.apply(x, dim, group)


def all_reduce_no_grad(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """A plain all-reduce outside autograd (statistics such as the softmax max)."""
    if group_size(group) == 1:
        return x
    with torch.no_grad():
        return _all_reduce(x, group, op)
