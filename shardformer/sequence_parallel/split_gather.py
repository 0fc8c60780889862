"""Megatron sequence parallelism on the tensor-parallel group (`sp_mode="split_gather"`).

Outside the tensor-parallel regions (norms, residual adds) every rank of the tp group holds a
chunk of the sequence instead of all of it; inside them (attention and MLP, heads and features
split by tp) every rank sees the whole sequence. No HF forward is touched; the seams are:
  * a forward pre-hook on each decoder layer: it reads the true sequence length S from the
    layer's `position_embeddings` (or `position_ids`) argument, and on the first layer splits
    the hidden states (`comm.split_seq`: zero-padded to a multiple of tp, this rank's chunk;
    backward all-gathers);
  * the hooks that hand each norm's output to its column-parallel linears (`Policy
    .tp_input_copies`) become `comm.gather_seq`: all-gather along the sequence, cut to S
    (backward: reduce-scatter, as the linears' input gradients are partial);
  * row-parallel linears reduce-scatter their partial products along the sequence instead of
    all-reducing them (backward: all-gather);
  * the final norm's output is gathered for the LM head (backward: reduce-scatter for the
    vocab-parallel head, whose input gradient is partial; each rank's chunk otherwise).
Norm weights (and row-parallel biases) now see only this rank's tokens: their gradients are
partial over tp, which their `ShardSpec` says, so the gradient reducer sums them.
The padding lives only in the split regions: attention and the loss see exactly S tokens, so a
length the split does not divide changes nothing, `generate` (S = 1 per step) included.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..comm import gather_seq, split_seq
from ..sharding import ShardSpec, record_specs

SEQ_DIM = 1  # transformers' hidden states are [batch, sequence, hidden]


@dataclass
class SplitGatherPlan:
    layers: list[str]
    gathers: dict[str, int] = field(default_factory=dict)  # producer path -> layer index
    rows: dict[str, int] = field(default_factory=dict)  # row-parallel linear path -> layer index
    final_norm: str = ""
    head_input_partial: bool = True  # the final norm feeds a vocab-parallel head


def plan_split_gather(model: nn.Module, policy, tp_plan) -> SplitGatherPlan:
    """Validate split_gather against the policy and the tensor-parallel plan (no collective;
    `ShardConfig` already checked tp_size > 1 and sp_size == 1)."""
    gathered = {path for targets in tp_plan.input_copies.values() for path in targets}
    ungathered = sorted(p for p, kind in tp_plan.kinds.items() if kind == "column" and p not in gathered)
    if ungathered:
        raise policy.entry_error("tp_input_copies", dict(policy.tp_input_copies),
                                 f"must cover every column-parallel linear for sp_mode='split_gather' "
                                 f"(missing {ungathered[0]})")
    if not policy.final_norm:
        raise policy.entry_error("final_norm", policy.final_norm, "must name the base model's final norm "
                                 "for sp_mode='split_gather' (the sequence is gathered after it)")
    base = model.get_submodule(tp_plan.base_path.rstrip(".")) if tp_plan.base_path else model
    policy.resolve(base, policy.final_norm, type(base).__name__, "final_norm")
    layers = [f"{tp_plan.layers_path}.{i}" for i in range(len(model.get_submodule(tp_plan.layers_path)))]

    def layer_of(path):
        return next(i for i, layer in enumerate(layers) if path.startswith(layer + "."))

    return SplitGatherPlan(
        layers,
        gathers={owner: layer_of(owner) for owner in tp_plan.input_copies},
        rows={p: layer_of(p) for p, kind in tp_plan.kinds.items() if kind == "row"},
        final_norm=tp_plan.base_path + policy.final_norm,
        head_input_partial=tp_plan.head_path is not None,
    )


class _SequenceLength:
    """The true sequence length of the call a decoder layer is running (set by its pre-hook just
    before its body runs, also when gradient checkpointing re-runs it)."""

    full = 0


def _sequence_length(args, kwargs) -> int:
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is not None:
        return position_embeddings[0].shape[-2]
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids.shape[-1]
    raise RuntimeError("sp_mode='split_gather' reads the sequence length from the decoder layer's "
                       "position_embeddings or position_ids argument; this model passes neither")


def _layer_pre_hook(length: _SequenceLength, group, first: bool):
    def hook(module, args, kwargs):
        length.full = _sequence_length(args, kwargs)
        if not first:
            return None
        if args:
            return (split_seq(args[0], SEQ_DIM, group),) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=split_seq(kwargs["hidden_states"], SEQ_DIM, group))

    return hook


def _gather_hook(length: _SequenceLength, group, reduce_grad: bool = True):
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
    lengths = [_SequenceLength() for _ in plan.layers]
    for i, path in enumerate(plan.layers):
        layer = model.get_submodule(path)
        layer.register_forward_pre_hook(_layer_pre_hook(lengths[i], group, i == 0), with_kwargs=True)
        for module in layer.modules():
            if not getattr(module, "sf_shard_specs", None):
                _mark_partial(module, tp)
    for owner, i in plan.gathers.items():
        tp_handles.pop(owner).remove()
        model.get_submodule(owner).register_forward_hook(_gather_hook(lengths[i], group))
    for path in plan.rows:
        row = model.get_submodule(path)
        row.sequence_dim = SEQ_DIM
        _mark_partial(row, tp, ["bias"])
    final = model.get_submodule(plan.final_norm)
    _mark_partial(final, tp)
    final.register_forward_hook(_gather_hook(lengths[-1], group, plan.head_input_partial))
    if head is not None:
        head.copy_input = False  # its input gradient is reduce-scattered by the gather above
