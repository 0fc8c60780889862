"""Apply a tensor-parallel plan (see `plan.py`) to an unmodified HF model by substituting leaf
modules: planned `nn.Linear`s become column / row parallel linears (and `split_norms` split
RMSNorms over their outputs), the token embedding and the LM
head become vocab parallel (slicing the existing weights, so the sharded model starts identical
to the unsharded one), and the vocab-parallel loss is installed through the model's
`loss_function` hook. No collective runs here.

No HF forward is replaced: attention, decoder layers and the model run their own code on the
local heads (HF reshapes with -1 heads; `attention_local_attrs` fixes the per-rank counts, and
`attention_local_config` those an attention reads from its config, through a `LocalConfig`).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from ..comm import copy_to_group
from ..sharding import ShardSpec, record_specs
from .embedding import VocabParallelEmbedding
from .experts import apply_experts
from .linear import ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead
from .local_config import LocalConfig
from .norm import SplitRMSNorm
from .loss import LOSSES
from .plan import TensorParallelPlan


def _copy_output_to(group):
    """Forward hook: hand the module's output to the tp group (gradient all-reduced in backward)."""

    def hook(module, args, output):
        return copy_to_group(output, group)

    return hook


def _repoint(model: nn.Module, old, new) -> None:
    """Other modules holding the replaced head's `old` Parameter (BERT's `cls.predictions.bias`
    is its decoder's bias) hold this rank's `new` piece instead."""
    if old is None:
        return
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is old:
                module._parameters[name] = new


def apply_tensor_parallel(model: nn.Module, plan: TensorParallelPlan, policy, group, tp_rank: int) -> dict:
    """Substitute the planned modules (see module docstring). Returns {producer path: handle of
    the hook that hands its output to the tp group}, for a later stage (sequence parallelism)
    to replace."""
    handles = {}
    for path, spec in plan.specs.items():
        cls = ColumnParallelLinear if plan.kinds[path] == "column" else RowParallelLinear
        policy.replace(model, path, cls.from_linear(model.get_submodule(path), spec, group, tp_rank))
    for owner, linears in plan.input_copies.items():
        handles[owner] = model.get_submodule(owner).register_forward_hook(_copy_output_to(group))
        for path in linears:
            model.get_submodule(path).copy_input = False
    for path in plan.partial_modules:  # whole on every rank, each rank's gradient from its own heads
        module = model.get_submodule(path)
        record_specs(module, **{name: ShardSpec(0, 0, 1, plan.tp, partial=True)
                                for name, _ in module.named_parameters(recurse=False)})
    for path, (spec, form) in plan.split_norms.items():
        policy.replace(model, path, SplitRMSNorm.from_norm(model.get_submodule(path), spec, form, group, tp_rank))
    for path, specs in plan.experts.items():
        apply_experts(model.get_submodule(path), specs, group, tp_rank)
    for path, attrs in plan.attention_attrs.items():
        attention = model.get_submodule(path)
        for attr, value in attrs.items():
            setattr(attention, attr, value)
    for path, overrides in plan.attention_config.items():
        model.get_submodule(path).config = LocalConfig(model, overrides)

    embedding = VocabParallelEmbedding.from_embedding(
        model.get_submodule(plan.embedding_path), plan.vocab_spec, group, tp_rank, scale=plan.embedding_scale
    )
    policy.replace(model, plan.embedding_path, embedding)
    if plan.head_path is not None:
        shared = embedding.weight if plan.tied else None
        old = model.get_submodule(plan.head_path)
        head = VocabParallelLMHead.from_linear(old, plan.vocab_spec, group, tp_rank, weight=shared)
        head.gathers = policy.gathered_lm_head
        policy.replace(model, plan.head_path, head)
        _repoint(model, old.bias, head.bias)
        if not policy.gathered_lm_head:
            model.loss_function = partial(LOSSES[policy.loss], head=head)
    return handles
