"""A tensor-parallel group simulated in one process: one thread per rank (`block_check.py`).

`SimulatedGroup.all_reduce` sums a tensor over the rank threads (in rank order). On it:
    CopyToGroup      forward identity, backward all-reduce of the gradient (a column region's input)
    ReduceFromGroup  forward all-reduce, backward identity (a row-parallel linear's partial products)
    RankLinear       one rank's column-parallel linear (`y_r = x W_r^T + b_r`, W's rows split) or
                     row-parallel linear (`y = sum_r x_r W_r^T + b`, W's columns split), its pieces cut
                     by the engine's own `split_tensor` from the plan's `ShardSpec`.
Backward runs on the calling thread for CPU tensors, so the threads' all-reduces pair up there too.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
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

    def __init__(self, linear: nn.Linear, kind: str, spec, group, rank: int, copy_input: bool):
        from shardformer.sharding import split_tensor

        super().__init__()
        self.kind, self.group, self.rank, self.copy_input = kind, group, rank, copy_input
        self.weight = nn.Parameter(split_tensor(linear.weight.detach(), spec, rank))
        if linear.bias is None or kind == "row":
            self.bias = linear.bias  # a row linear's bias is whole, added after the sum
        else:
            self.bias = nn.Parameter(split_tensor(linear.bias.detach(), spec, rank))

    def forward(self, x):
        if self.kind == "row":
            y = ReduceFromGroup.apply(F.linear(x, self.weight), self.group, self.rank)
            return y if self.bias is None else y + self.bias
        if self.copy_input:
            x = CopyToGroup.apply(x, self.group, self.rank)
        return F.linear(x, self.weight, self.bias)
