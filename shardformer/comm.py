"""Autograd-aware collectives over one process group, built on functional collectives.

Each op is a `torch.autograd.Function` whose forward and backward call
`torch.distributed._functional_collectives`, so `torch.compile` traces them as collectives rather
than graph-breaking on c10d calls. A group of size 1 makes every op the identity.

    op                 forward                    backward
    copy_to_group      identity                   all-reduce (sum)
    reduce_from_group  all-reduce (sum)           identity
    gather_from_group  all-gather, concat on dim  keep this rank's slice of dim

Outside autograd: `all_reduce_no_grad` (statistics), and `agree_on_failure` / `raise_if_failed`,
which make a collective entry point of the library fail on every rank or on none: a rank that
hit an error still takes part in one small collective saying so, and every rank then raises
(the failing rank its own error, the others an error of the same kind naming it).
"""
from __future__ import annotations

import contextlib

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


def comm_device(group=None) -> torch.device:
    """Where tensors for collectives on `group` must live: CPU when the group runs gloo (also a
    "cpu:gloo,cuda:nccl" group), else the current GPU (NCCL)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error)


def raise_if_failed(failed: bool, error: BaseException | None, group, what: str) -> None:
    """Second half of an agreement: every rank of `group` already knows that *some* rank failed
    (`failed`, from a collective they all ran). If so, gather the errors (one more collective)
    and raise: this rank's own error if it has one, else a ValueError (when every failing rank
    raised ValueError) or RuntimeError naming the failing ranks and their errors."""
    if not failed:
        return
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, None if error is None else _describe(error), group=group)
    if error is not None:
        raise error
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(errors)))
    named = [(rank, e) for rank, e in zip(ranks, errors) if e is not None]
    kind = ValueError if all(e[0] == "ValueError" for _, e in named) else RuntimeError
    detail = "; ".join(f"rank {rank}: {name}: {message}" for rank, (name, message) in named)
    raise kind(f"{what} failed on another rank, so it stops on every rank ({detail})")


def agree_on_failure(error: BaseException | None, group, what: str) -> None:
    """One small all-reduce over `group` (every rank must call it, failed or not), then
    `raise_if_failed`. Returns normally only when no rank of `group` failed."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(flag, group=group)
    raise_if_failed(bool(flag.item()), error, group, what)


@contextlib.contextmanager
def all_or_none(group, what: str):
    """Run a block of local work (no collective inside) that may fail on some ranks only; on
    exit every rank of `group` agrees: all continue, or all raise (see `agree_on_failure`)."""
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised (here or on every rank) just below
        error = err
    agree_on_failure(error, group, what)
