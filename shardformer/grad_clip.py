"""Global gradient-norm clipping across every model-parallel group.

The norm is that of the unsharded model's gradient: each rank adds the norm terms of the
gradient entries it holds, weighting each entry by 1 / (number of ranks of its replica holding
it: `ShardSpec.replicas` tp ranks times `ShardSpec.stage_copies` pipeline stages) so that it
counts once per replica. One all-reduce over the whole world
sums them; every data-parallel (and sequence-parallel) copy holds the same reduced gradients, so
the sum is divided by dp x sp (for the inf-norm the max needs no division). Same clip rule as
`torch.nn.utils.clip_grad_norm_`: grads *= min(1, max_norm / (total_norm + 1e-6)).

The same all-reduce carries a failure flag: a rank that cannot compute its part still joins it,
and then every rank of every replica raises (see `comm.raise_if_failed`) instead of the others
waiting forever or clipping alone.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .comm import comm_device, raise_if_failed
from .sharding import local, sharded_parameters


def _local_norm_term(entries, norm_type: float, device) -> torch.Tensor:
    partial = torch.zeros((), device=device)
    for grad, copies in entries:
        g = grad.detach().float()
        if math.isinf(norm_type):
            partial = torch.maximum(partial, g.abs().max().to(device))
        else:
            partial = partial + (g.abs().pow(norm_type).sum() / copies).to(device)
    return partial


def model_gradients(model) -> list[tuple[torch.Tensor, int]]:
    """(gradient, ranks of its replica holding the same entries) for every parameter with one."""
    return [(local(p.grad), spec.replicas * spec.stage_copies) for _, p, spec in sharded_parameters(model)
            if p.grad is not None]


def clip_gradients(entries, max_norm: float, dp: int, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the gradients of `entries` ((gradient, copies) pairs, see `model_gradients`) in place by
    their global norm; return that norm (before clipping). `dp`: how many ranks hold identical
    copies of each gradient entry beyond `copies` (`ParallelGroups.data_size` for a model's own
    gradients, 1 for ZeRO's disjoint pieces). Every rank of the world must call this."""
    norm_type = float(norm_type)
    group = None  # the world
    device = comm_device(group)
    error, partial = None, torch.zeros((), device=device)
    try:
        if not max_norm > 0:
            raise ValueError(f"clip_grad_norm_(max_norm={max_norm!r}) must be a positive number")
        partial = _local_norm_term(entries, norm_type, device)
    except Exception as err:  # noqa: BLE001 - every rank raises below, after the shared all-reduce
        error, partial = err, torch.zeros((), device=device)
    infinite = math.isinf(norm_type)
    both = torch.stack([partial.float(), torch.tensor(float(error is not None), device=device)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM, group=group)
    raise_if_failed(bool(both[1].item()), error, group, "clip_grad_norm_")
    total = both[0] if infinite else (both[0] / dp).pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g, _ in entries:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, dp: int, norm_type: float = 2.0) -> torch.Tensor:
    """Clip a sharded model's gradients in place by their global norm; return that norm.
    `dp`: `ParallelGroups.data_size`. Every rank of the world must call this."""
    return clip_gradients(model_gradients(model), max_norm, dp, norm_type)
