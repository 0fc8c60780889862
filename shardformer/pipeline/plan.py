"""Pipeline planning: which decoder layers each stage runs and which pp rank holds each stage.
No collective, no change to the model; every impossible layout is a ValueError naming the
config field and the model attribute.

Placement (torch.distributed.pipelining's): gpipe and 1f1b run one stage per pp rank; interleaved
places stages in a loop (stage s on pp rank s mod pp), zbv in a V (pp rank r holds stages r and
2 pp - 1 - r), two stages per rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .partition import balanced_split, estimate_costs


@dataclass(frozen=True)
class PipelinePlan:
    schedule: str
    pp: int
    microbatches: int
    split: tuple[int, ...]  # decoder layers per stage
    costs: tuple[float, ...]  # estimated share of the model per stage
    layers_path: str  # the decoder-layer ModuleList
    embedding_path: str
    final_norm_path: str
    head_path: str
    tied: bool

    @property
    def stages(self) -> int:
        return len(self.split)

    def owner(self, stage: int) -> int:
        """The pp rank (index on the pp axis) holding `stage`."""
        if self.schedule == "zbv" and stage >= self.pp:
            return 2 * self.pp - 1 - stage
        return stage % self.pp

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s in range(self.stages) if self.owner(s) == pp_rank]

    def layer_range(self, stage: int) -> range:
        start = sum(self.split[:stage])
        return range(start, start + self.split[stage])

    def describe(self) -> str:
        parts = [f"stage {s} (pp rank {self.owner(s)}): layers {r.start}-{r.stop - 1}, est. {c:.1%}"
                 for s, (r, c) in enumerate(zip(map(self.layer_range, range(self.stages)), self.costs))]
        return f"pipeline {self.schedule}, {self.microbatches} microbatches: " + "; ".join(parts)


def _check_microbatches(schedule: str, pp: int, stages: int, n: int) -> None:
    if schedule == "1f1b" and n < pp:
        raise ValueError(f"ShardConfig.num_microbatches={n} must be at least ShardConfig.pp_size={pp} "
                         "for pp_schedule='1f1b' (use 'gpipe' for fewer)")
    if schedule == "interleaved":
        rounds = max(1, n // pp)
        if n % rounds:
            raise ValueError(f"ShardConfig.num_microbatches={n} does not suit pp_schedule='interleaved' at "
                             f"ShardConfig.pp_size={pp}: it must divide by max(1, num_microbatches // pp_size)")


def plan_pipeline(model: nn.Module, policy, tp_plan, config) -> PipelinePlan:
    """Validate the pipeline layout against `model` (see module docstring)."""
    pp, schedule = config.pp_size, config.pp_schedule
    name = type(model).__name__
    if tp_plan.head_path is None:
        raise ValueError(f"ShardConfig.pp_size={pp}: pipeline training needs a model with an LM head "
                         f"(a *ForCausalLM); {name} has none")
    if policy.final_norm is None:
        raise policy.entry_error("final_norm", None, "must name the final norm for pipeline parallelism")
    if policy.position_embedding is not None:
        raise policy.entry_error("position_embedding", policy.position_embedding,
                                 f"(learned positions added to inputs_embeds) is not supported with ShardConfig.pp_size="
                                 f"{pp} yet: a later stage fed hidden states would add them again")
    layers = model.get_submodule(tp_plan.layers_path)
    final_norm = tp_plan.base_path + policy.final_norm
    policy.resolve(model, final_norm, name, "final_norm")
    n_layers, stages = len(layers), pp * config.virtual_stages
    per_rank = f" ({config.virtual_stages} per pp rank for pp_schedule={schedule!r})" if stages > pp else ""
    if stages > n_layers:
        raise ValueError(f"ShardConfig.pp_size={pp} asks for {stages} stages{per_rank}, more than the model's "
                         f"{n_layers} decoder layers (model.config.num_hidden_layers={n_layers})")
    embedding = model.get_submodule(tp_plan.embedding_path)
    head = model.get_submodule(tp_plan.head_path)
    costs = estimate_costs(list(layers), embedding, [model.get_submodule(final_norm), head], tp_plan.tied)
    if config.pp_stage_layers is not None:
        split = config.pp_stage_layers
        if len(split) != stages or sum(split) != n_layers:
            raise ValueError(f"ShardConfig.pp_stage_layers={split} must give {stages} stages{per_rank} summing to "
                             f"model.config.num_hidden_layers={n_layers} (got {len(split)} summing to {sum(split)})")
    else:
        split = balanced_split(costs, stages)
    microbatches = config.num_microbatches or pp
    _check_microbatches(schedule, pp, stages, microbatches)
    return PipelinePlan(schedule, pp, microbatches, tuple(split), tuple(costs.of(split)), tp_plan.layers_path,
                        tp_plan.embedding_path, final_norm, tp_plan.head_path, tp_plan.tied)
