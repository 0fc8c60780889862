"""Megatron sequence parallelism on the tensor-parallel group (`sp_mode="split_gather"`).

Outside the tensor-parallel regions (norms, residual adds) every rank of the tp group holds a
chunk of the sequence instead of all of it; inside them (attention and MLP, heads and features
split by tp) every rank sees the whole sequence. No HF forward is touched; the seams are:
  * a forward pre-hook on each decoder layer: it reads the true sequence length S from the
    layer's `position_embeddings` (or `position_ids`) argument, and on the first layer splits
    the hidden states (`comm.split_seq`: zero-padded to a multiple of tp, this rank's chunk;
    backward all-gathers);
  * the hooks that hand each norm's output to its column-parallel linears (`Policy
    .tp_input_copies`) compute those linears at once (`_GatheredLinears`): one all-gather of the
    sequence chunk, cut to S, one matmul per linear; only the chunk is kept for backward, which
    gathers it again once and reduce-scatters the input gradient once (it is partial: each rank
    holds other output features). Each linear then returns its precomputed output; column
    linears that no producer hands their input (post-norm layers: OLMo 2) have it gathered at
    the input of the module holding them (`_GatherAtInput`);
  * row-parallel linears reduce-scatter their partial products along the sequence instead of
    all-reducing them (backward: all-gather);
  * the final norm's output is gathered for the LM head (backward: reduce-scatter for the
    vocab-parallel head, whose input gradient is partial; each rank's chunk otherwise).
  * with pipeline parallelism, stages pass the whole sequence: each stage's first layer splits
    its input and the last layer of every stage but the last gathers its output (backward: each
    rank keeps its chunk of the gradient, which the next stage's split gathered whole).
Norm weights (and row-parallel biases) now see only this rank's tokens: their gradients are
partial over tp, which their `ShardSpec` says, so the gradient reducer sums them.
The padding lives only in the split regions: attention and the loss see exactly S tokens, so a
length the split does not divide changes nothing, `generate` (S = 1 per step) included.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..comm import gather_seq, split_seq
from ..sharding import ShardSpec, record_specs
from .common import SequenceLength, layer_paths, resolve_final_norm, sequence_length, with_hidden_states

SEQ_DIM = 1  # transformers' hidden states are [batch, sequence, hidden]


@dataclass
class SplitGatherPlan:
    layers: list[str]
    gathers: dict[str, int] = field(default_factory=dict)  # producer path -> layer index
    consumers: dict[str, list[str]] = field(default_factory=dict)  # producer path -> column linears
    rows: dict[str, int] = field(default_factory=dict)  # row-parallel linear path -> layer index
    own_gathers: dict[str, int] = field(default_factory=dict)  # column linear with no producer -> layer index
    final_norm: str = ""
    head_input_partial: bool = True  # the final norm feeds a vocab-parallel head
    stage_starts: set[int] = field(default_factory=lambda: {0})  # layers whose input is split
    stage_ends: set[int] = field(default_factory=set)  # layers whose output is gathered (pipeline)


def plan_split_gather(model: nn.Module, policy, tp_plan) -> SplitGatherPlan:
    """Validate split_gather against the policy and the tensor-parallel plan (no collective;
    `ShardConfig` already checked tp_size > 1 and sp_size == 1)."""
    gathered = {path for targets in tp_plan.input_copies.values() for path in targets}
    final_norm = resolve_final_norm(model, policy, tp_plan,
                                    "for sp_mode='split_gather' (the sequence is gathered after it)")
    layers = layer_paths(model, tp_plan)

    def layer_of(path):
        return next(i for i, layer in enumerate(layers) if path.startswith(layer + "."))

    own_gathers = {p: layer_of(p) for p, kind in tp_plan.kinds.items() if kind == "column" and p not in gathered}
    holders = {path.rpartition(".")[0] for path in own_gathers}
    for path, i in own_gathers.items():
        holder = path.rpartition(".")[0]
        refuse = lambda why: policy.entry_error(  # noqa: E731
            "tp_input_copies", dict(policy.tp_input_copies), f"does not hand model.{path} its input: {why}")
        if holder == layers[i]:
            raise refuse("it sits directly in its decoder layer; sp_mode='split_gather' gathers such a linear's "
                         "input at the module holding it (an attention or MLP module)")
        handed = sorted("model." + p for p in gathered if p.rpartition(".")[0] == holder)
        if handed:
            raise refuse(f"it hands {', '.join(handed)} in the same module (model.{holder}) theirs: list every "
                         "column linear of that module there, or none (sp_mode='split_gather' then gathers the "
                         "module's input once for all of them)")
        inner = sorted(h for h in holders if h.startswith(holder + "."))
        if inner:
            raise refuse(f"neither does it hand the linears in model.{inner[0]}, inside model.{holder}, theirs; "
                         "sp_mode='split_gather' would gather the sequence twice")
    return SplitGatherPlan(
        layers,
        gathers={owner: layer_of(owner) for owner in tp_plan.input_copies},
        consumers={owner: list(targets) for owner, targets in tp_plan.input_copies.items()},
        rows={p: layer_of(p) for p, kind in tp_plan.kinds.items() if kind == "row"},
        own_gathers=own_gathers,
        final_norm=final_norm,
        head_input_partial=tp_plan.head_path is not None,
    )


def _layer_pre_hook(length: SequenceLength, group, first: bool):
    def hook(module, args, kwargs):
        length.full = sequence_length(kwargs, "split_gather")
        if not first:
            return None
        return with_hidden_states(args, kwargs, lambda h: split_seq(h, SEQ_DIM, group))

    return hook


class _GatheredLinears(torch.autograd.Function):
    """(gather(x), y_i = gather(x) W_i^T + b_i) for column-parallel linears sharing the sequence
    chunk x; the gathered input is returned for HF's code to read shapes from (no gradient).
        forward: one all-gather of x along the sequence (cut to `full`); saves x's chunk only
        backward: one all-gather of the chunk again; dL/dx = sum_i dL/dy_i W_i, reduce-scattered
                  along the sequence (padded to a multiple of the group)"""

    @staticmethod
    def forward(ctx, x, full, group, n, *weights_and_biases):
        weights, biases = weights_and_biases[:n], weights_and_biases[n:]
        gathered = comm._all_gather(x, SEQ_DIM, group).narrow(SEQ_DIM, 0, full)
        ctx.full, ctx.group, ctx.n, ctx.has_bias = full, group, n, [b is not None for b in biases]
        ctx.save_for_backward(x, *weights)
        ctx.mark_non_differentiable(gathered)
        return (gathered, *(F.linear(gathered, w, b) for w, b in zip(weights, biases)))

    @staticmethod
    def backward(ctx, _, *grads):
        x, *weights = ctx.saved_tensors
        gathered = comm._all_gather(x, SEQ_DIM, ctx.group).narrow(SEQ_DIM, 0, ctx.full)
        flat = gathered.reshape(-1, gathered.shape[-1])
        grad_x, grad_w, grad_b = None, [], []
        for g, w, has_bias in zip(grads, weights, ctx.has_bias):
            if g is None:
                g = gathered.new_zeros(*gathered.shape[:-1], w.shape[0])
            part = g @ w.to(g.dtype)
            grad_x = part if grad_x is None else grad_x + part
            g2 = g.reshape(-1, g.shape[-1])
            grad_w.append((g2.t() @ flat.to(g2.dtype)).to(w.dtype))
            grad_b.append(g2.sum(0) if has_bias else None)
        grad_x = comm._reduce_scatter(comm._pad_to_multiple(grad_x, SEQ_DIM, ctx.group), SEQ_DIM, ctx.group)
        return (grad_x.to(x.dtype), None, None, None, *grad_w, *grad_b)


def _linears_hook(length: SequenceLength, group, linears: list):
    """Forward hook on a norm: compute its column-parallel linears from its sequence chunk; the
    norm's output becomes the gathered sequence, which those linears receive and answer with
    their precomputed outputs."""

    def hook(module, args, output):
        gathered, *outs = _GatheredLinears.apply(output, length.full, group, len(linears),
                                                 *[lin.linear_weight for lin in linears], *[lin.bias for lin in linears])
        for linear, out in zip(linears, outs):
            linear.sf_precomputed = (gathered, out)
        return gathered

    return hook


def _refuse_other_input(path: str):
    def refuse(x):
        raise RuntimeError(f"sp_mode='split_gather': {path} was called with an input other than its norm's output "
                           "(the policy's tp_input_copies says the norm's output is its only input)")

    return refuse


class _GatherAtInput:
    """Column-parallel linears that no `tp_input_copies` producer hands their input (a post-norm
    layer such as OLMo 2's feeds q / k / v the layer's own input): a pre-hook on the module that
    holds them (`self_attn`, `mlp`) gathers its hidden-states chunk once (`gather_seq`: backward
    reduce-scatters the linears' summed partial gradient), so HF's code there sees the whole
    sequence; each linear must then be called with that gathered tensor (else a RuntimeError)."""

    def __init__(self, length: SequenceLength, group, path: str):
        self.length, self.group, self.path, self.gathered = length, group, path, None

    def pre_hook(self, module, args, kwargs):
        def gather(h):
            self.gathered = gather_seq(h, SEQ_DIM, self.length.full, self.group, True)
            return self.gathered

        return with_hidden_states(args, kwargs, gather)

    def clear(self, *_) -> None:
        self.gathered = None

    def checker(self, linear_path: str):
        def check(x):
            if x is not self.gathered:
                raise RuntimeError(f"sp_mode='split_gather': {linear_path} was called with an input other than "
                                   f"{self.path}'s hidden states, which split_gather gathered for it")
            return x

        return check


def _gather_hook(length: SequenceLength, group, reduce_grad: bool = True):
    def hook(module, args, output):
        return gather_seq(output, SEQ_DIM, length.full, group, reduce_grad)

    return hook


def _mark_partial(module: nn.Module, tp: int, names=None) -> None:
    """This module's replicated parameters see only this rank's tokens: partial over tp."""
    own = dict(module.named_parameters(recurse=False))
    specs = {name: ShardSpec(0, 0, 1, tp, partial=True) for name in (names or own) if own.get(name) is not None}
    if specs:
        record_specs(module, **specs)


def apply_split_gather(model: nn.Module, plan: SplitGatherPlan, tp_handles: dict, group, tp: int, head=None) -> None:
    """Install the hooks of the module docstring (local: no collective). `tp_handles`: the tp
    input-copy hooks to replace (from `apply_tensor_parallel`); `head`: the vocab-parallel LM head."""
    lengths = [SequenceLength() for _ in plan.layers]
    for i, path in enumerate(plan.layers):
        layer = model.get_submodule(path)
        layer.register_forward_pre_hook(_layer_pre_hook(lengths[i], group, i in plan.stage_starts), with_kwargs=True)
        if i in plan.stage_ends:  # a pipeline stage ends here: the next one receives the whole sequence
            layer.register_forward_hook(_gather_hook(lengths[i], group, reduce_grad=False))
        for module in layer.modules():
            if not getattr(module, "sf_shard_specs", None):
                _mark_partial(module, tp)
    for owner, i in plan.gathers.items():
        tp_handles.pop(owner).remove()
        linears = [model.get_submodule(path) for path in plan.consumers[owner]]
        for path, linear in zip(plan.consumers[owner], linears):
            linear.sequence_input = _refuse_other_input(path)
        model.get_submodule(owner).register_forward_hook(_linears_hook(lengths[i], group, linears))
    holders = {}
    for path, i in plan.own_gathers.items():
        parent = path.rpartition(".")[0]
        if parent not in holders:
            holders[parent] = _GatherAtInput(lengths[i], group, parent)
            module = model.get_submodule(parent)
            module.register_forward_pre_hook(holders[parent].pre_hook, with_kwargs=True)
            module.register_forward_hook(holders[parent].clear)
        linear = model.get_submodule(path)
        linear.sequence_input = holders[parent].checker(path)
    for path in plan.rows:
        row = model.get_submodule(path)
        row.sequence_dim = SEQ_DIM
        _mark_partial(row, tp, ["bias"])
    final = model.get_submodule(plan.final_norm)
    _mark_partial(final, tp)
    final.register_forward_hook(_gather_hook(lengths[-1], group, plan.head_input_partial))
    if head is not None:
        head.copy_input = False  # its input gradient is reduce-scattered by the gather above
