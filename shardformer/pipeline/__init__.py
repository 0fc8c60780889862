"""Pipeline parallelism: an unmodified HF model cut into stages (identity placeholders, hidden
states fed as `inputs_embeds`), balanced by estimated cost, run by torch.distributed.pipelining
schedules."""
from .partition import StageCosts, balanced_split, estimate_costs
from .plan import PipelinePlan, plan_pipeline
from .runner import PipelineRunner
from .stage import AbsentEmbedding, AbsentLayer, PassThrough, StageModule, cut_model

__all__ = ["StageCosts", "balanced_split", "estimate_costs", "PipelinePlan", "plan_pipeline", "PipelineRunner",
           "AbsentEmbedding", "AbsentLayer", "PassThrough", "StageModule", "cut_model", "apply_pipeline"]


def apply_pipeline(model, plan: PipelinePlan, groups, call_model, sequence=None) -> PipelineRunner:
    """Cut `model` to this rank's stages and return their runner (local: the groups exist);
    `sequence`: the sequence split of the hidden states passed between stages (`PipelineRunner`)."""
    import dataclasses

    from ..sharding import ShardSpec

    pp_rank = groups.mesh.get_local_rank("pp")
    mine = plan.stages_of(pp_rank)
    tied_param = None
    if groups.tied is not None:  # the first and last stages are on different ranks: two copies
        tied_param = model.get_submodule(plan.embedding_path).weight
        tp = groups.size("tp")
        for module in model.modules():
            specs = dict(getattr(module, "sf_shard_specs", {}))
            for name, value in list(module.named_parameters(recurse=False)):
                if value is tied_param:
                    specs[name] = dataclasses.replace(specs.get(name, ShardSpec.replicated(tp)), stage_copies=2)
                    module.sf_shard_specs = specs
    cut_model(model, plan, mine)
    runner = PipelineRunner(model, plan, pp_rank, groups.pp, groups.tied, tied_param, call_model,
                            model.config.hidden_size, sequence)
    return runner
