"""ZeRO stage 3: the weights themselves sharded over the data-parallel ranks with FSDP2.

`apply_zero3` calls `torch.distributed.fsdp.fully_shard` on every decoder layer (one unit each:
its parameters are all-gathered for its forward and again for its backward, and freed after)
and then on the whole model (the embedding, final norm and LM head, tied or not, in one root
unit; with pipelines on each stage module instead, see below), over the dp axis of the mesh
(dp x sp flattened, with all_to_all or ring sequence parallelism: those ranks hold the same
weights and their gradients are averaged together).
Tensor parallelism is applied first, so FSDP shards each rank's tensor-parallel piece (a plain
tensor) along its first dimension: FSDP runs on dp and shardformer's own collectives on tp.
FSDP2 reduce-scatters gradients (their mean over dp) during backward; parameters and gradients are DTensors over dp, which the optimizer,
`clip_grad_norm_` (this rank's shards count once) and `full_state_dict` (gathered with
`full_tensor()`, then over tp) handle. `ShardConfig.cpu_offload` keeps the shards, gradients
and optimizer step in CPU memory (FSDP2's `CPUOffloadPolicy`).

A model built on the meta device (`sf.load_pretrained`, `sf.init_model`) is sharded the same
way (FSDP2 accepts meta modules), then materialised with `module.to_empty(device=...)`, FSDP2's
documented way (it keeps every parameter object, ties included, and re-pads FSDP's shard
storage), and filled through `local_region`: which rows of the tensor-parallel piece this rank
holds (FSDP2's `Shard(0)`: `torch.chunk` semantics, ceil(rows / dp) rows per rank, the last
ranks fewer or none).

Partial gradients over tp (KV heads replicated when tp exceeds them, split_gather's norm
weights) are summed over their copies by the reducer's hooks, which reach FSDP's unsharded
parameters (see `reducer.py`): each backward's gradient is summed before FSDP accumulates and
reduce-scatters it.

Mixed precision: a model in bf16 or fp16 (its dtype recorded as `model.sf_param_dtype`, which
`model.dtype`, `save_pretrained` and `full_state_dict` report) gets fp32 parameters before
sharding, so FSDP's shards are the fp32 master weights the optimizer steps; FSDP2's
`MixedPrecisionPolicy` casts them to the model's dtype for the all-gather and compute and
reduce-scatters gradients in fp32. fp16 loss scaling is `sf.ZeroOptimizer`'s.

With pipeline parallelism each of a rank's stage modules is the FSDP root of its own layers'
units and holds the embedding / final norm / head its stage runs. Each microbatch's backward
reduce-scatters its gradients and reshards its layers as any FSDP2 backward does
(`pipeline.runner._Stage`: torch's own stage would keep every layer's whole parameters and
gradients until the step's last microbatch, no ZeRO-3 saving at the peak); under `no_sync()`
they accumulate unsharded and are reduce-scattered at the step's end. Tied embeddings on two
stages are two sharded copies, whose gradients' shards are summed over the two ranks
(`PipelineRunner.finish`). Refused at setup (ValueError): the zbv schedule.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def plan_zero3(config, tp_plan, pp_plan=None) -> None:
    """ValueError for a layout stage 3 does not support (no collective): the zbv pipeline schedule,
    whose split backward (input gradients first, weight gradients later) FSDP2's gradient
    reduce-scatter does not follow (its weights came out wrong in a test)."""
    if pp_plan is not None and pp_plan.schedule == "zbv":
        raise ValueError("ShardConfig.zero_stage=3 with ShardConfig.pp_schedule='zbv' is not supported (FSDP2 does "
                         "not follow its split backward): use pp_schedule '1f1b', 'gpipe' or 'interleaved', or "
                         "zero_stage 1 or 2")


def local_region(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) per dimension of the part of `tensor` this rank holds: the whole tensor
    for a plain tensor; for a DTensor (ZeRO-3's parameters) the region of its global shape (the
    tensor-parallel piece) that `to_local()` holds, each `Shard(d)` placement cutting dimension d
    with `torch.chunk` semantics (as DTensor and FSDP2 do). Collective-free."""
    from torch.distributed.tensor import DTensor

    region = [(0, size) for size in tensor.shape]
    if not isinstance(tensor, DTensor):
        return region
    mesh, coordinate = tensor.device_mesh, tensor.device_mesh.get_coordinate()
    for axis, placement in enumerate(tensor.placements):
        if placement.is_shard():
            dim = placement.dim % tensor.dim()
            start, length = region[dim]
            size = -(-length // mesh.size(axis))  # torch.chunk: ceil, the last chunks shorter or empty
            first = min(coordinate[axis] * size, length)
            region[dim] = (start + first, min(size, length - first))
    held = tuple(tensor.to_local().shape)
    if tuple(length for _, length in region) != held:  # a placement this function does not model
        raise ValueError(f"ZeRO-3: a parameter of shape {tuple(tensor.shape)} placed {tensor.placements} holds "
                         f"{held} on this rank, not the chunk {region} expected")
    return region


def fp32_masters(model: nn.Module):
    """Record the model's dtype (`sf_param_dtype`); for bf16 / fp16 make every floating
    parameter fp32 (buffers keep theirs) and return FSDP2's policy computing in that dtype with
    fp32 gradient reduction. Returns the default policy for an fp32 model. Local."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    model.sf_param_dtype = dtype
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_zero3(model: nn.Module, layers: nn.ModuleList, groups, cpu_offload: bool, stages=()) -> None:
    """Shard `model`'s weights over the dp axis (see module docstring). Collective-free setup.
    `stages`: the pipeline stage modules this rank runs (pp > 1), each then the root of its own
    layers' units, holding the embedding / final norm / head it runs (each microbatch's backward
    reduce-scatters: `pipeline.runner._Stage`)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = groups.mesh["dp"]
    if groups.size("sp") > 1:  # sequence parallelism: shard and average over dp x sp (the data group)
        mesh = groups.mesh["dp", "sp"]._flatten("dp_sp")
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    policies = dict(mesh=mesh, offload_policy=offload, mp_policy=fp32_masters(model))
    for layer in layers:
        if any(True for _ in layer.parameters()):  # not a layer another pipeline stage holds
            fully_shard(layer, **policies)
    # the roots too are resharded after each forward: a forward without backward (evaluation,
    # generate) must not leave the embedding / head gathered for an optimizer built after it
    for root in stages or (model,):
        fully_shard(root, reshard_after_forward=True, **policies)


def fsdp_roots(model: nn.Module) -> list:
    """The FSDP2 roots of a ZeRO-3 model: its pipeline stage modules, else the model."""
    runner = getattr(model, "sf_pipeline", None)
    return list(runner.modules) if runner is not None else [model]


@contextlib.contextmanager
def no_gradient_sync(model):
    """FSDP2's gradient accumulation without reduce-scatter (`set_requires_gradient_sync`). With
    pipelines torch's stage turns the sync back on at each step's last microbatch: the gradient
    is then reduce-scattered at every step, which accumulates the same sum."""
    roots = fsdp_roots(model)
    for root in roots:
        root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for root in roots:
            root.set_requires_gradient_sync(True)
