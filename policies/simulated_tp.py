"""A tensor-parallel group simulated in one process: one thread per rank (`block_check.py`).

`SimulatedGroup.all_reduce` sums a tensor over the rank threads (in rank order). On it:
    CopyToGroup      forward identity, backward all-reduce of the gradient (a column region's input)
    ReduceFromGroup  forward all-reduce, backward identity (a row-parallel linear's partial products)
    RankLinear       one rank's column-parallel linear (`y_r = x W_r^T + b_r`, W's rows split) or
                     row-parallel linear (`y = sum_r x_r W_r^T + b`, W's columns split), its pieces cut
                     by the engine's own `split_tensor` from the plan's `ShardSpec` (an `nn.Linear` or
                     transformers' `Conv1D`, computed as the engine computes it)
    rank_experts     one rank's stacked-experts module: its 3-D parameters cut to this rank's pieces,
                     its floating-point inputs through CopyToGroup and its output through
                     ReduceFromGroup (as `shardformer/tensor_parallel/experts.py` does)
    RankRMSNorm      one rank's RMSNorm over features split over tp (`Policy.split_norms`): its
                     weight cut as the normalised linear's outputs (`split_tensor`, the linear's
                     `ShardSpec`), the engine's own `split_rms_norm` formula with each row's sum
                     of squares through ReduceFromGroup then CopyToGroup (all-reduced in forward
                     and in backward, as `shardformer/tensor_parallel/norm.py` does), divided by
                     the KV replicas.
Backward runs on the calling thread for CPU tensors, so the threads' all-reduces pair up there too.
"""
from __future__ import annotations

import threading

import torch
from torch import nn


class SimulatedGroup:
    """The simulated tp group: a sum over the rank threads, in rank order."""

    def __init__(self, tp: int):
        self.barrier, self.slots = threading.Barrier(tp, timeout=120), [None] * tp

    def all_reduce(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        self.slots[rank] = x
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:
            total = total + other
        self.barrier.wait()
        return total


class CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (a column region's input)."""

    @staticmethod
    def forward(ctx, x, group, rank):
        ctx.group, ctx.rank = group, rank
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_reduce(grad, ctx.rank), None, None


class ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward; identity backward (a row-parallel linear's partial products)."""

    @staticmethod
    def forward(ctx, x, group, rank):
        return group.all_reduce(x, rank)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class RankLinear(nn.Module):
    """One simulated rank's column- or row-parallel linear."""

    def __init__(self, linear: nn.Module, kind: str, spec, group, rank: int, copy_input: bool):
        from shardformer.sharding import split_tensor
        from shardformer.tensor_parallel.linear import _bias_spec, weight_layout

        super().__init__()
        self.kind, self.group, self.rank, self.copy_input = kind, group, rank, copy_input
        self.transposed = weight_layout(linear)[2]
        self.weight = nn.Parameter(split_tensor(linear.weight.detach(), spec, rank))
        if linear.bias is None or kind == "row":
            self.bias = linear.bias  # a row linear's bias is whole, added after the sum
        else:
            self.bias = nn.Parameter(split_tensor(linear.bias.detach(), _bias_spec(spec), rank))

    def forward(self, x):
        from shardformer.tensor_parallel.linear import _matmul

        if self.kind == "row":
            y = ReduceFromGroup.apply(_matmul(x, self.weight, None, self.transposed), self.group, self.rank)
            return y if self.bias is None else y + self.bias
        if self.copy_input:
            x = CopyToGroup.apply(x, self.group, self.rank)
        return _matmul(x, self.weight, self.bias, self.transposed)


def rank_experts(module: nn.Module, specs: dict, group, rank: int) -> None:
    """Make `module` (a rank's copy of a stacked-experts module) this rank's share of it."""
    from shardformer.sharding import split_tensor

    for name, spec in specs.items():
        setattr(module, name, nn.Parameter(split_tensor(getattr(module, name).detach(), spec, rank)))

    def copy(x):
        return CopyToGroup.apply(x, group, rank) if torch.is_tensor(x) and x.is_floating_point() else x

    module.register_forward_pre_hook(lambda m, args, kwargs: (tuple(copy(a) for a in args),
                                                              {k: copy(v) for k, v in kwargs.items()}),
                                     with_kwargs=True)
    module.register_forward_hook(lambda m, args, out: ReduceFromGroup.apply(out, group, rank))


class RankRMSNorm(nn.Module):
    """One simulated rank's SplitRMSNorm (see the module docstring); `form` = (eps,
    cast_before_weight) from `rms_norm_form`."""

    def __init__(self, norm: nn.Module, spec, form: tuple[float, bool], group, rank: int):
        from shardformer.sharding import split_tensor

        super().__init__()
        self.group, self.rank, self.features, self.replicas = group, rank, spec.full, spec.replicas
        self.eps, self.cast_before_weight = form
        self.weight = nn.Parameter(split_tensor(norm.weight.detach(), spec, rank))

    def total(self, s: torch.Tensor) -> torch.Tensor:
        s = CopyToGroup.apply(ReduceFromGroup.apply(s, self.group, self.rank), self.group, self.rank)
        return s / self.replicas if self.replicas > 1 else s

    def forward(self, x):
        from shardformer.tensor_parallel.norm import split_rms_norm

        return split_rms_norm(x, self.weight, self.eps, self.features, self.total, self.cast_before_weight)
