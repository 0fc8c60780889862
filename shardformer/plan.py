"""All validation of a layout against a model, with no collective and no change to the model.

`plan_layout` checks the world against the config, resolves the policy against the model for
every parallelism (tensor, sequence and pipeline parallelism, and the fused kernels) and returns what to apply.
Every impossible layout is a ValueError naming the config field and the model attribute (or the
policy entry); `shard_model` has all ranks agree on the outcome before its first other collective.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ShardConfig
from .fusion import plan_fused_kernels
from .data_parallel.zero3 import plan_zero3
from .mesh import check_world
from .pipeline import PipelinePlan, plan_pipeline
from .sequence_parallel import SplitGatherPlan, UlyssesPlan, plan_split_gather, plan_ulysses
from .tensor_parallel.experts import check_family_layout
from .tensor_parallel.plan import TensorParallelPlan, plan_tensor_parallel


@dataclass
class LayoutPlan:
    """What `shard_model` applies, in this order: `kernels`, `tp`, `sp`, `pp`."""

    config: ShardConfig
    policy: object
    dp: int
    tp: TensorParallelPlan
    kernels: list  # (path, module, builder) from plan_fused_kernels; [] without fused kernels
    sp: SplitGatherPlan | UlyssesPlan | None = None
    pp: PipelinePlan | None = None


def plan_layout(model: nn.Module, policy, config: ShardConfig, world_size: int) -> LayoutPlan:
    """Validate `config` against the world and `model` with `policy`; see the module docstring."""
    dp = check_world(config, world_size)
    tp = plan_tensor_parallel(model, policy, config.tp_size)
    check_family_layout(model, policy, config)
    if config.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"ShardConfig.gradient_checkpointing=True but {type(model).__name__}.supports_gradient_checkpointing is False"
        )
    kernels = plan_fused_kernels(model, policy, tp.layers_path, tp.base_path) if config.enable_fused_kernels else []
    sp = None
    if config.sp_mode == "split_gather":
        sp = plan_split_gather(model, policy, tp)
    elif config.sp_mode in ("all_to_all", "ring"):
        sp = plan_ulysses(model, policy, tp, config)
    pp = plan_pipeline(model, policy, tp, config) if config.pp_size > 1 else None
    if config.zero_stage == 3:
        plan_zero3(config, tp, pp)
    if pp is not None and sp is not None:  # each stage's first layer cuts its input to this rank's part
        starts = [pp.layer_range(s).start for s in range(pp.stages)]
        sp.stage_starts = set(starts)
        if isinstance(sp, SplitGatherPlan):  # the sequence is whole between stages: gathered at their ends
            sp.stage_ends = {start - 1 for start in starts[1:]}
    return LayoutPlan(config, policy, dp, tp, kernels, sp, pp)


if __name__ == "__main__":  # python -m shardformer.plan: the memory planner (planner.py)
    import sys

    from shardformer.planner import main

    sys.exit(main())
