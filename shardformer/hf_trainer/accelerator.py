"""The Trainer's `accelerate.Accelerator`, made to see a sharded model's data-parallel axis as its world.

`transformers.Trainer` does everything distributed through its accelerator: it asks it to wrap the
model (`DistributedDataParallel`), to shard its data loaders over `num_processes`, to gather losses,
token counts and predictions, to clip gradients, and it multiplies the loss by `num_processes` when
it averages tokens across devices. For a model from `sf.shard_model` each of these must be about
the dp axis only: the ranks of one replica (its tp / sp peers) compute one model together on the
same batch, and the model reduces its own gradients in its backward hooks.

`data_parallel_view(accelerator, model)` changes the class of the Trainer's accelerator (in place,
to a subclass of its own class) so that:
  * `num_processes` / `process_index` are the dp size and this rank's dp index: data loaders are
    sharded over dp only (every rank of a replica iterates the same batches: accelerate's own
    `BatchSamplerShard` / `IterableDatasetShard` with the dp figures), and the Trainer's
    token-averaged loss is multiplied by dp, the factor the model's dp mean divides out;
  * `gather` (and `gather_for_metrics`, which calls it) runs over the dp group: token counts,
    logged and evaluation losses count each replica once;
  * `prepare_model` never wraps the sharded model in DDP or moves it; autocast and
    `torch.compile` are applied as configured (accelerate's `evaluation_mode`);
  * `clip_grad_norm_` clips by the unsharded model's global norm (`model.clip_grad_norm_`, which
    hands over to `sf.ZeroOptimizer` under ZeRO); the parameters passed are ignored;
  * `backward` multiplies the loss by `sf.ZeroOptimizer`'s fp16 loss scale (1 otherwise), as
    `model.forward_backward` does.
Everything about the whole world (the state, `is_main_process`, the process group) is unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _gather_over(group, size: int):
    """A function gathering one tensor over `group` on dim 0 (0-d tensors become 1-d, as accelerate's do)."""

    def gather_one(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        tensor = tensor[None] if tensor.dim() == 0 else tensor.contiguous()
        if size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts, dim=0)

    return gather_one


class DataParallelAccelerator:
    """Mixin placed in front of the Trainer's accelerator class (see module docstring); the sharded
    model is `self.sf_model`."""

    sf_model: torch.nn.Module

    @property
    def num_processes(self) -> int:
        return self.sf_model.sf_mesh["dp"].size()

    @property
    def process_index(self) -> int:
        return self.sf_model.sf_mesh.get_local_rank("dp")

    @property
    def is_last_process(self) -> bool:
        return self.process_index == self.num_processes - 1

    def gather(self, tensor):
        """accelerate's `gather` over the dp group: each replica's values once."""
        from accelerate.utils import recursively_apply

        group = self.sf_model.sf_mesh.get_group("dp")
        return recursively_apply(_gather_over(group, self.num_processes), tensor, error_on_other_type=True)

    def prepare_model(self, model, device_placement=None, evaluation_mode: bool = False):
        if self._is_sharded(model):  # the model reduces its own gradients: no DDP, no device move
            return super().prepare_model(model, device_placement=False, evaluation_mode=True)
        return super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """Clip by the unsharded model's global gradient norm; returns it (`parameters` ignored:
        the Trainer passes the model's, and the norm needs every rank's shards)."""
        return self.sf_model.clip_grad_norm_(float(max_norm), norm_type)

    def backward(self, loss, **kwargs):
        zero = getattr(self.sf_model, "sf_zero", None)
        if zero is not None and zero.loss_scale != 1.0:
            loss = loss * zero.loss_scale
        return super().backward(loss, **kwargs)

    def _is_sharded(self, model) -> bool:
        inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        return inner is self.sf_model


def data_parallel_view(accelerator, model) -> None:
    """Give `accelerator` (a Trainer's) the dp-only view of the sharded `model` (see module
    docstring), in place; a second call only updates the model."""
    accelerator.sf_model = model
    if isinstance(accelerator, DataParallelAccelerator):
        return
    base = type(accelerator)
    accelerator.__class__ = type(f"DataParallel{base.__name__}", (DataParallelAccelerator, base),
                                 {"__module__": __name__})
