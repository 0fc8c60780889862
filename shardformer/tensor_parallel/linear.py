"""Tensor-parallel linear layers (Megatron-style), built from an existing `nn.Linear` or
transformers' `Conv1D` (GPT-2).

`y = x W^T + b` with `W` of shape [out, in]; a `Conv1D` stores `W^T` ([in, out], `transposed`:
its split dimensions below are swapped, and it is computed with `addmm` as HF does).

ColumnParallelLinear splits `out` (W rows and b): rank r computes y[..., out_r]; for a packed
W (`ShardSpec.parts`: fused q/k/v or gate/up), out_r is rank r's share of every part, in order.
    forward: identity on x, no collective (output stays split on the last dim)
    backward: all-reduce (sum) of dL/dx over the tp group (skipped with `copy_input=False`,
              when the producer of x already did it once for several linears)
RowParallelLinear splits `in` (W columns); its input is already split on the last dim.
    forward: all-reduce (sum) of the partial x_r W_r^T over the tp group, then + b (b replicated)
    backward: identity on dL/dy, no collective
  With `sequence_dim` set (sequence parallelism, sp_mode="split_gather"):
    forward: reduce-scatter of the partial products along the sequence (each rank keeps its
             chunk), then + b (b's gradient is then partial: summed by the reducer)
    backward: all-gather of dL/dy along the sequence
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import copy_to_group, gather_from_group, reduce_from_group, scatter_seq
from ..sharding import ShardSpec, record_specs, split_parameter


def weight_layout(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) of an `nn.Linear`, or of transformers' `Conv1D`
    (weight [in, out], `transposed` True); None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.nx, module.nf, True
    return None


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x W^T + b, with W stored as [in, out] when `transposed` (HF's Conv1D: addmm)."""
    if not transposed:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    y = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
    return y.view(*x.shape[:-1], weight.shape[1])


class ColumnParallelLinear(nn.Module):
    """Linear layer with its output features split over the tp group (see module docstring).

    `spec` says how `out` is cut; `spec.replicas > 1` means several ranks hold the same rows
    (replicated KV heads): their gradients are summed by the gradient reducer, not here.
    """

    copy_input = True
    # Sequence parallelism (split_gather) computes this linear together with its siblings from
    # their shared sequence chunk and leaves (input, output) here for the call that follows;
    # `sequence_input` handles a call with another input (split_gather refuses it, or gathers it
    # when no producer hands the linear its input).
    sf_precomputed = None
    sequence_input = None

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, spec: ShardSpec, group,
                 transposed: bool = False):
        super().__init__()
        self.weight, self.bias, self.group, self.transposed = weight, bias, group, transposed
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if transposed else \
            (weight.shape[1], weight.shape[0])
        record_specs(self, weight=spec, **({"bias": _bias_spec(spec)} if bias is not None else {}))

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: ShardSpec, group, tp_rank: int):
        """From an `nn.Linear` or a `Conv1D` (`spec` splits the output dimension of its weight)."""
        transposed = weight_layout(linear)[2]
        return cls(split_parameter(linear.weight, spec, tp_rank),
                   split_parameter(linear.bias, _bias_spec(spec), tp_rank), spec, group, transposed)

    @property
    def linear_weight(self) -> torch.Tensor:
        """The weight as `nn.Linear` holds it, [out, in] (a view for a Conv1D's [in, out])."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending, self.sf_precomputed = self.sf_precomputed, None
        if pending is not None and pending[0] is x:
            return pending[1]
        if self.sequence_input is not None:
            x = self.sequence_input(x)
        elif self.copy_input:
            x = copy_to_group(x, self.group)
        return _matmul(x, self.weight, self.bias, self.transposed)

    def extra_repr(self) -> str:
        spec = self.sf_shard_specs["weight"]
        return f"in={self.in_features}, out={self.out_features} of {spec.full}, bias={self.bias is not None}"


class RowParallelLinear(nn.Module):
    """Linear layer with its input features split over the tp group (see module docstring)."""

    sequence_dim: int | None = None

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, spec: ShardSpec, group,
                 transposed: bool = False):
        super().__init__()
        self.weight, self.bias, self.group, self.transposed = weight, bias, group, transposed
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if transposed else \
            (weight.shape[1], weight.shape[0])
        record_specs(self, weight=spec)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: ShardSpec, group, tp_rank: int):
        """From an `nn.Linear` or a `Conv1D` (`spec` splits the input dimension of its weight)."""
        return cls(split_parameter(linear.weight, spec, tp_rank), linear.bias, spec, group, weight_layout(linear)[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _matmul(x, self.weight, None, self.transposed)
        if self.sequence_dim is None:
            y = reduce_from_group(y, self.group)
        else:
            y = scatter_seq(y, self.sequence_dim, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        spec = self.sf_shard_specs["weight"]
        return f"in={self.in_features} of {spec.full}, out={self.out_features}, bias={self.bias is not None}"


def _bias_spec(spec: ShardSpec) -> ShardSpec:
    """A column-parallel bias is split as its weight's output dimension, its only one."""
    return spec if spec.dim == 0 else dataclasses.replace(spec, dim=0)


class VocabParallelLMHead(ColumnParallelLinear):
    """Output projection with the vocabulary (W rows) split over the tp group; logits stay split.

    The vocabulary is zero-padded to a multiple of tp inside the weight; the padded columns are
    cut from the output, so rank r returns logits for tokens [vocab_start, vocab_start + n_r)
    and no padded logit reaches a loss or a user.
        forward: identity on x; output split on the vocab dim (no collective)
        backward: all-reduce (sum) of dL/dx over the tp group
    """

    def __init__(self, weight, bias, spec: ShardSpec, group, tp_rank: int):
        super().__init__(weight, bias, spec, group)
        self.vocab_start = spec.start(tp_rank)
        self.vocab_valid = spec.valid(tp_rank)
        self.vocab_size = spec.full

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: ShardSpec, group, tp_rank: int, weight=None):
        """`weight`: an already-split Parameter to share (tied input/output embeddings)."""
        if weight is None:
            weight = split_parameter(linear.weight, spec, tp_rank)
        return cls(weight, split_parameter(linear.bias, spec, tp_rank), spec, group, tp_rank)

    # True only inside one fused-loss call of the sharded model (see tensor_parallel/forward.py):
    # the head then returns its input, the hidden states, in place of the logits, and the loss is
    # computed from them chunk by chunk by `fused_causal_lm_loss` (full logits never exist).
    returns_hidden = False
    # `Policy.gathered_lm_head`: the model computes its own loss from the logits (BERT's masked LM),
    # so forward gathers them to the full vocabulary (backward: keep this rank's slice).
    gathers = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.returns_hidden:
            return x
        logits = super().forward(x)
        if self.gathers:
            return self.gather_logits(logits)
        if self.vocab_valid < self.out_features:
            logits = logits[..., : self.vocab_valid]
        return logits

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from this rank's slice (used for outputs without labels)."""
        if logits.shape[-1] == self.vocab_size and self.gathers:
            return logits  # already gathered in forward
        pad = self.out_features - logits.shape[-1]
        if pad:
            logits = F.pad(logits, (0, pad))
        return gather_from_group(logits, -1, self.group)[..., : self.vocab_size]
