"""Global gradient-norm clipping across every model-parallel group.

The norm is that of the unsharded model's gradient: each rank adds the squares of the gradient
entries it holds, weighting a replicated parameter by 1 / (number of tp ranks holding it) so that
it counts once; the sums are all-reduced over the tp group. Gradients are identical across dp
after the gradient reducer ran, so dp needs no reduction. Same clip rule as
`torch.nn.utils.clip_grad_norm_`: grads *= min(1, max_norm / (total_norm + 1e-6)).
"""
from __future__ import annotations

import math

import torch

from .layers.comm import all_reduce_no_grad
from .layers.shard import sharded_parameters


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, tp_group, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients in place by their global norm; return that norm (before clipping)."""
    tp = torch.distributed.get_world_size(tp_group)
    norm_type = float(norm_type)
    device = next(model.parameters()).device
    grads, partial = [], torch.zeros((), device=device)
    for _, param, spec in sharded_parameters(model):
        if param.grad is None:
            continue
        grads.append(param.grad)
        copies = tp if spec is None else spec.replicas
        g = param.grad.detach().float()
        if math.isinf(norm_type):
            term = g.abs().max()
            partial = torch.maximum(partial, term)
        else:
            term = g.abs().pow(norm_type).sum() / copies
            partial = partial + term
    if math.isinf(norm_type):
        total = all_reduce_no_grad(partial, tp_group, "max")
    else:
        total = all_reduce_no_grad(partial, tp_group, "sum").pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total
