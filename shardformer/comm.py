"""Autograd-aware collectives over one process group, built on functional collectives.

Each op is a `torch.autograd.Function` whose forward and backward call
`torch.distributed._functional_collectives`, so `torch.compile` traces them as collectives rather
than graph-breaking on c10d calls. A group of size 1 makes every op the identity.

    op                 forward                    backward
    copy_to_group      identity                   all-reduce (sum)
    reduce_from_group  all-reduce (sum)           identity
    gather_from_group  all-gather, concat on dim  keep this rank's slice of dim

Sequence ops (a sequence dim of true length S, zero-padded to S_pad, a multiple of the group
size, in the split regions; the padding never leaves them):
    split_seq          pad to S_pad, keep my chunk             all-gather, cut to S
    gather_seq         all-gather, cut to S                    pad, reduce-scatter (partial
                                                               grads) or keep my chunk
    scatter_seq        pad to S_pad, reduce-scatter            all-gather, cut to S
    (split_seq and gather_seq take a `grad_scale` for the sp axis: see sequence_parallel/)
    all_to_all         chunk scatter_dim over the group,        the inverse all-to-all
                       concat what arrives on gather_dim
    sum_over           all-reduce (sum)                        identity times grad_scale

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

# Newer torch names them *_single (*_tensor are deprecated); same semantics.
_all_gather_dim0 = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
_reduce_scatter_dim0 = getattr(fc, "reduce_scatter_single", None) or fc.reduce_scatter_tensor
# the same for the in-place c10d calls (torch 2.11 has only the *_tensor names)
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    return fc.wait_tensor(fc.all_reduce(x.contiguous(), op, group))


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    stacked = fc.wait_tensor(_all_gather_dim0(x.contiguous(), 0, group))
    if dim % x.dim() == 0:
        return stacked
    return torch.cat(stacked.chunk(world, dim=0), dim=dim)


def _local_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of x along dim, in storage of its own (a view, contiguous or not, would keep
    all of x alive as long as the chunk is saved for backward)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(world, dim=dim)[rank].clone(memory_format=torch.contiguous_format)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    moved = x.movedim(dim, 0).contiguous()
    return fc.wait_tensor(_reduce_scatter_dim0(moved, "sum", 0, group)).movedim(0, dim)


def pad_to_multiple(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """`x` zero-padded at the end of `dim` to a multiple of `multiple` (no copy when it is one)."""
    pad = -x.shape[dim] % multiple
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _pad_to_multiple(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return pad_to_multiple(x, dim, dist.get_world_size(group))


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


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1 else x * scale


class _SplitSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_scale):
        ctx.dim, ctx.group, ctx.full, ctx.grad_scale = dim, group, x.shape[dim], grad_scale
        return _local_slice(_pad_to_multiple(x, dim, group), dim, group)

    @staticmethod
    def backward(ctx, grad):
        full = _all_gather(grad, ctx.dim, ctx.group).narrow(ctx.dim, 0, ctx.full)
        return _scaled(full, ctx.grad_scale), None, None, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, full, group, reduce_grad, grad_scale):
        ctx.dim, ctx.group, ctx.reduce_grad, ctx.grad_scale = dim, group, reduce_grad, grad_scale
        return _all_gather(x, dim, group).narrow(dim, 0, full)

    @staticmethod
    def backward(ctx, grad):
        grad = _pad_to_multiple(grad, ctx.dim, ctx.group)
        local = _reduce_scatter(grad, ctx.dim, ctx.group) if ctx.reduce_grad else _local_slice(grad, ctx.dim, ctx.group)
        return _scaled(local, ctx.grad_scale), None, None, None, None, None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group, ctx.full = dim, group, x.shape[dim]
        return _reduce_scatter(_pad_to_multiple(x, dim, group), dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group).narrow(ctx.dim, 0, ctx.full), None, None


def split_seq(x: torch.Tensor, dim: int, group, grad_scale: float = 1.0) -> torch.Tensor:
    """This rank's chunk of the (zero-padded) sequence; backward all-gathers the gradient (times
    `grad_scale`)."""
    return x if group_size(group) == 1 else _SplitSeq.apply(x, dim, group, grad_scale)


def gather_seq(x: torch.Tensor, dim: int, full: int, group, reduce_grad: bool = True,
               grad_scale: float = 1.0) -> torch.Tensor:
    """The whole sequence (true length `full`) from every rank's chunk. Backward: the gradient is
    reduce-scattered when each rank's is partial (`reduce_grad`, e.g. the input of a
    column-parallel linear), else each rank keeps its chunk (replicated computation after it);
    then times `grad_scale`."""
    return x if group_size(group) == 1 else _GatherSeq.apply(x, dim, full, group, reduce_grad, grad_scale)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    stacked = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    received = fc.wait_tensor(fc.all_to_all_single(stacked, None, None, group))
    return torch.cat(received.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Chunk `scatter_dim` over the group (chunk j to rank j) and concatenate what arrives along
    `gather_dim` (in rank order); backward is the inverse all-to-all. `scatter_dim`'s size must
    divide by the group size."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, scatter_dim, gather_dim, group)


class _SumScaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_scale):
        ctx.grad_scale = grad_scale
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _scaled(grad, ctx.grad_scale), None, None


def sum_over(x: torch.Tensor, group, grad_scale: float = 1.0) -> torch.Tensor:
    """All-reduce (sum) in forward; backward passes the gradient on times `grad_scale`."""
    return x if group_size(group) == 1 else _SumScaled.apply(x, group, grad_scale)


def scatter_seq(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum partial results over the group, each rank keeping its sequence chunk (the output of
    a row-parallel linear); backward all-gathers the gradient."""
    return x if group_size(group) == 1 else _ScatterSeq.apply(x, dim, group)


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
    """(type name, message), the message followed by its causes' (a library that wraps an error,
    as torch's pipeline stages do, keeps the original visible)."""
    message, cause, seen = str(error).strip(), error.__cause__, 0
    while cause is not None and seen < 4:
        message += f" [caused by {type(cause).__name__}: {str(cause).strip()}]"
        cause, seen = cause.__cause__, seen + 1
    return type(error).__name__, message


def raise_if_failed(failed: bool, error: BaseException | None, group, what: str, name_all: bool = False) -> None:
    """Second half of an agreement: every rank of `group` already knows that *some* rank failed
    (`failed`, from a collective they all ran). If so, gather the errors (one more collective)
    and raise: this rank's own error if it has one, else a ValueError (when every failing rank
    raised ValueError) or RuntimeError naming the failing ranks and their errors."""
    if not failed:
        return
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, None if error is None else _describe(error), group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(errors)))
    named = [(rank, e) for rank, e in zip(ranks, errors) if e is not None]
    if error is not None and (not name_all or len(named) == 1):
        raise error
    kind = ValueError if all(e[0] == "ValueError" for _, e in named) else RuntimeError
    detail = "; ".join(f"rank {rank}: {name}: {message}" for rank, (name, message) in named)
    raise kind(f"{what} failed on {'several ranks' if len(named) > 1 else 'another rank'}, so it stops on every "
               f"rank ({detail})") from error


def agree_on_failure(error: BaseException | None, group, what: str, name_all: bool = False) -> None:
    """One small all-reduce over `group` (every rank must call it, failed or not), then
    `raise_if_failed`. Returns normally only when no rank of `group` failed. `name_all`: when
    several ranks failed (one failure causing others, e.g. timeouts of a pipeline's waiting
    stages), every rank raises the error naming all of them (chained to its own)."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(flag, group=group)
    raise_if_failed(bool(flag.item()), error, group, what, name_all)


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
