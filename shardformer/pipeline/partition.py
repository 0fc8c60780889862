"""Cutting the decoder layers into pipeline stages, balanced by estimated cost (no collective).

A stage's cost is half compute, half memory, each as a share of the whole model's:
  * compute: matmul FLOPs per token, 2 x (parameters of every `nn.Linear`) in a layer; the LM
    head adds 2 x hidden x vocab (its logits and loss); the embedding is a lookup (no FLOPs);
  * memory: parameters (with their gradients and optimizer state, proportional to them).
So an input embedding weighs about half a large layer per billion parameters of vocabulary,
and a large-vocabulary head, which is both, weighs several layers (Llama-3-8B: the head about
2.4 layers, the embedding about 1.2). Stages are contiguous runs of layers; the split that
minimises the most loaded stage is found exactly by dynamic programming. Works on models built
on the meta device (only shapes are read).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class StageCosts:
    """Estimated cost of each decoder layer, of the input embedding (first stage) and of the
    final norm + LM head (last stage), as shares of the whole model (they sum to 1)."""

    layers: tuple[float, ...]
    first: float
    last: float

    def of(self, split: tuple[int, ...]) -> list[float]:
        """The cost of each stage of `split` (layers per stage)."""
        costs, start = [], 0
        for i, n in enumerate(split):
            cost = sum(self.layers[start:start + n])
            cost += self.first if i == 0 else 0.0
            cost += self.last if i == len(split) - 1 else 0.0
            costs.append(cost)
            start += n
        return costs


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def estimate_costs(layers: list[nn.Module], embedding: nn.Module, tail: list[nn.Module],
                   tied: bool) -> StageCosts:
    """Costs (see module docstring) of `layers`, of the `embedding` and of the `tail` modules
    (final norm, LM head); a head tied to the embedding still costs its compute, and its
    parameters are counted on both the first and the last stage (each holds a copy)."""
    flops = [2.0 * _linear_params(layer) for layer in layers]
    params = [float(_params(layer)) for layer in layers]
    vocab_params = float(_params(embedding))
    head_flops = 2.0 * sum(_linear_params(m) for m in tail) + (2.0 * vocab_params if tied else 0.0)
    head_params = float(sum(_params(m) for m in tail)) + (vocab_params if tied else 0.0)
    total_flops = sum(flops) + head_flops
    total_params = sum(params) + vocab_params + head_params

    def share(f: float, p: float) -> float:
        return 0.5 * f / total_flops + 0.5 * p / total_params

    return StageCosts(tuple(share(f, p) for f, p in zip(flops, params)), share(0.0, vocab_params),
                      share(head_flops, head_params))


def balanced_split(costs: StageCosts, stages: int) -> tuple[int, ...]:
    """Layers per stage (each at least one, contiguous) minimising the most loaded stage."""
    n = len(costs.layers)
    prefix = [0.0]
    for c in costs.layers:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the least possible max cost of the first s stages holding layers [0, i)
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                cost = prefix[i] - prefix[j] + (costs.first if s == 1 else 0.0)
                cost += costs.last if s == stages else 0.0
                worst = max(best[s - 1][j], cost)
                if worst < best[s][i]:
                    best[s][i], cut[s][i] = worst, j
    split, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        split.append(i - j)
        i = j
    return tuple(reversed(split))
