"""`shard_model`: turn an unmodified HF model into this rank's shard of a parallel model.

    plan (no collective: plan.py) -> all ranks agree -> mesh and groups (collectives)
    -> apply in one fixed order: fused kernels, tensor parallelism, sequence parallelism,
       gradient checkpointing, pipeline stages, the gradient reducer -> all ranks agree
    -> the sharded class

The model object itself is sharded in place and returned: its class becomes a subclass of the
original (same name) that adds `forward_backward` (the training step, for any layout),
`clip_grad_norm_` and `no_sync`; `forward` is still the HF call with the HF output, parameter
names are unchanged, `generate` still works. The subclass's `forward` wraps the HF one (same
signature): it checks that the replica's ranks got the same batch (`batch_check.py`), then runs
the tensor-parallel output handling (`tensor_parallel/output.py`), so `model(...)` and
`model.forward(...)` behave the same.
"""
from __future__ import annotations

import collections
import copy
import functools
import inspect
import logging

import torch
import torch.distributed as dist

from . import policies as _policies
from .batch_check import check_batch
from .comm import agree_on_failure, all_or_none, all_reduce_no_grad
from .config import ShardConfig
from .data_parallel import GradReducer, apply_zero3
from .data_parallel.zero3 import no_gradient_sync
from .fusion import apply_fused_kernels, fused_loss_pays
from .grad_clip import clip_grad_norm_
from .mesh import build_groups, build_mesh, require_process_group
from .pipeline import apply_pipeline
from .sequence_parallel import SequenceCalls, SequenceChunks, apply_split_gather, apply_ulysses, gather_hidden_hook
from .sequence_parallel.batch import SPLIT_KEY, gather_batch
from .tensor_parallel import accepts_return_dict, apply_tensor_parallel, run_forward


logger = logging.getLogger("shardformer")


def describe_layout(model, groups) -> str:
    """One line: the mesh, the modules substituted (by class, counted), the attention path."""
    mesh = groups.mesh
    shape = " x ".join(f"{name} {mesh.size(i)}" for i, name in enumerate(mesh.mesh_dim_names))
    ours = collections.Counter(type(m).__name__ for m in model.modules()
                               if type(m).__module__.startswith("shardformer."))
    modules = ", ".join(f"{count} {name}" for name, count in sorted(ours.items())) or "none"
    config = model.sf_config
    sequence = f", sequence parallel {config.sp_mode}" if config.sp_mode else ""
    pipeline = f"; {model.sf_pipeline.plan.describe()}" if model.sf_pipeline is not None else ""
    return (f"shardformer: mesh {shape}{sequence}; substituted {modules}; "
            f"attention {model.config._attn_implementation}{pipeline}")


class ShardedModelMixin:
    """Methods added to a sharded model. State lives in `sf_mesh`, `sf_groups`, `sf_config`,
    `sf_policy`, `sf_grad_reducer`."""

    @property
    def dtype(self) -> torch.dtype:
        """HF's `model.dtype`; at ZeRO-3 the dtype the model computes in (`sf_param_dtype`: FSDP's
        shards of a bf16 / fp16 model are fp32 master weights)."""
        return getattr(self, "sf_param_dtype", None) or super().dtype

    def forward_backward(self, **batch) -> torch.Tensor:
        """Forward and backward on this rank's batch; returns the loss averaged over dp (detached),
        the same value on every rank. Gradients are reduced across replicas when it returns.

        Every rank of one replica passes the same batch (checked unless
        `ShardConfig.check_batch=False`), or every rank its `sf.split_batch` shard of it. A bad
        batch on any rank (no labels, an id or label outside the vocabulary) raises on every
        rank: the ranks share the outcome of that validation in one tiny all-gather over the
        world, with or without the check.
        With pipeline parallelism the configured schedule runs every microbatch; a failure on
        any rank inside it raises on every rank (a waiting stage gives up after
        `ShardConfig.pipeline_timeout_s`), naming every failing rank's error."""
        batch = self._validate_step(batch, "forward_backward")
        if self.sf_pipeline is not None:
            return self._pipeline_step(batch, train=True)
        loss = self._checked_loss(batch)
        if loss is None or loss.dim() != 0:
            raise ValueError(f"forward_backward: {type(self).__name__} returned no scalar loss for this batch")
        (loss * self.sf_zero.loss_scale if self.sf_zero is not None else loss).backward()
        return self._dp_mean(loss)

    @torch.no_grad()
    def forward_loss(self, **batch) -> torch.Tensor:
        """The loss of this batch without backward (evaluation), for any layout, pipeline
        included; averaged over dp, the same value on every rank. Same batch rules and
        validation as `forward_backward`."""
        batch = self._validate_step(batch, "forward_loss")
        if self.sf_pipeline is not None:
            return self._pipeline_step(batch, train=False)
        return self._dp_mean(self._checked_loss(batch))

    def _checked_loss(self, batch):
        """The model's loss on `batch`, whose check already ran (the call skips its own)."""
        self.sf_batch_checked = True
        try:
            out = self(**batch)
        finally:
            self.sf_batch_checked = False
        return out[0] if isinstance(out, tuple) else out.loss

    def _validate_step(self, batch, what: str) -> dict:
        """Validate the step's batch on every rank in one exchange over the world; returns the
        whole batch (an `sf.split_batch` shard is gathered first, after an exchange that pairs
        with another rank's validation, so that a mix of shards and whole batches, or of
        lengths, raises everywhere: the third flag counts the ranks that passed a shard)."""
        split = torch.tensor([int(SPLIT_KEY in batch)], dtype=torch.int64)
        if split.item():
            bad = check_batch(self.sf_groups, (), batch, dist.group.WORLD, None,
                              torch.cat([torch.zeros(2, dtype=torch.int64), split]), what, content=False)
            self._raise_split_mix(bad)
            batch = gather_batch(batch, self)
        error = None
        try:
            self._check_training_batch(batch, what)
        except ValueError as err:
            error = err
        flags = self._batch_range_flags(batch) if error is None else torch.zeros(2, dtype=torch.int64)
        bad = check_batch(self.sf_groups, (), batch, dist.group.WORLD, error, torch.cat([flags.cpu(), split]), what,
                          compare=self.sf_config.check_batch)
        self._raise_split_mix(bad)
        self._raise_range_error(bad[:2], what)
        return batch

    @staticmethod
    def _raise_split_mix(bad) -> None:
        if 0 < bad[2] < dist.get_world_size():
            raise ValueError(f"{int(bad[2])} of {dist.get_world_size()} ranks passed an sf.split_batch shard and the "
                             "others a whole batch: every rank must do the same")

    def _pipeline_step(self, batch, train: bool) -> torch.Tensor:
        runner, error, loss = self.sf_pipeline, None, None
        what = "forward_backward" if train else "forward_loss"
        sync = self.sf_grad_reducer.enabled  # False inside the user's no_sync()
        with self.sf_grad_reducer.no_sync():
            try:
                scale = self.sf_zero.loss_scale if self.sf_zero is not None else 1.0  # fp16 loss scaling
                loss = runner.train_step(batch, scale) if train else runner.eval_step(batch)
            except Exception as err:  # noqa: BLE001 - every rank raises below
                error = err
        agree_on_failure(error, None, what, name_all=True)
        loss = runner.finish(loss, train)
        if train and sync:
            self.sf_grad_reducer.reduce_now()  # once, after the last microbatch
        return self._dp_mean(loss)

    def _dp_mean(self, loss: torch.Tensor) -> torch.Tensor:
        dp_group = self.sf_mesh.get_group("dp")
        return all_reduce_no_grad(loss.detach().clone(), dp_group, "sum") / dist.get_world_size(dp_group)

    def _check_training_batch(self, batch, what: str) -> None:
        name = type(self).__name__
        if not self.sf_takes_labels:
            raise ValueError(f"{what} needs a model that computes a loss: {name}.forward takes no "
                             "labels (use a model with a head, e.g. *ForCausalLM, or call model(...) and "
                             "backward yourself)")
        if batch.get("labels") is None:
            raise ValueError(f"{what} needs labels=...: without labels {name} returns no loss")
        if self.sf_sequence_calls is not None:
            self.sf_sequence_calls.validate(batch)
        if self.sf_pipeline is not None:
            self.sf_pipeline.check_batch(batch)
        late = self.sf_grad_reducer.uncovered(self) if self.sf_config.zero_stage != 3 else []
        if late:
            raise ValueError(f"parameter {late[0]} (and {len(late) - 1} more) was made trainable after shard_model: "
                             "its gradient would not be reduced across ranks; set requires_grad before sharding")
        if self.sf_config.zero_stage in (1, 2) and self.sf_zero is None:
            raise ValueError(f"ShardConfig.zero_stage={self.sf_config.zero_stage}: wrap the optimizer with "
                             "sf.ZeroOptimizer(optimizer, model) before training")

    def _batch_range_flags(self, batch) -> torch.Tensor:
        """int64 [2] on the batch's device: input ids / labels outside the vocabulary (1 = bad)."""
        vocab = self.sf_vocab_size
        ids, labels = batch.get("input_ids"), batch.get("labels")
        device = next((t.device for t in (ids, labels) if torch.is_tensor(t)), torch.device("cpu"))
        flags = torch.zeros(2, dtype=torch.int64, device=device)
        if torch.is_tensor(ids):
            flags[0] = ((ids < 0) | (ids >= vocab)).any()
        if torch.is_tensor(labels) and self.sf_checks_labels:
            ignore = batch.get("ignore_index", -100)
            flags[1] = (((labels < 0) | (labels >= vocab)) & (labels != ignore)).any()
        return flags

    def _raise_range_error(self, bad, what: str) -> None:
        out = [w for w, b in zip(("input_ids", "labels"), bad.tolist()) if b]
        if out:
            raise ValueError(f"{what}: {' and '.join(out)} outside [0, model.config.vocab_size="
                             f"{self.sf_vocab_size}) on some rank (labels may also be the ignore index)")

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip all gradients by the global norm of the unsharded model's gradient; returns it.
        With ZeRO the gradients are the optimizer's pieces (or fp16-scaled): `sf.ZeroOptimizer.clip_grad_norm_`."""
        if self.sf_zero is not None:
            return self.sf_zero.clip_grad_norm_(max_norm, norm_type)
        if self.sf_config.zero_stage == 3:  # FSDP's gradient shards are disjoint over dp (x sp)
            return clip_grad_norm_(self, max_norm, 1, norm_type)
        return clip_grad_norm_(self, max_norm, self.sf_groups.data_size, norm_type)

    def no_sync(self):
        """Context manager: skip the data-parallel gradient reduction (gradient accumulation)."""
        if self.sf_config.zero_stage == 3:
            return no_gradient_sync(self)
        return self.sf_grad_reducer.no_sync()


def _sharded_class(cls: type) -> type:
    """A subclass of `cls` with the same name whose forward is HF's, checked and made whole."""
    hf_forward = cls.forward
    takes_return_dict = accepts_return_dict(hf_forward)

    @functools.wraps(hf_forward)
    def forward(self, *args, **kwargs):
        if self.sf_pipeline is not None:
            raise ValueError("with ShardConfig.pp_size > 1 each rank holds only its pipeline stages: train with "
                             "model.forward_backward(**batch) and evaluate with model.forward_loss(**batch)")
        if SPLIT_KEY in kwargs:  # an sf.split_batch shard: the structure is compared before the gather
            if self.sf_config.check_batch:
                check_batch(self.sf_groups, args, kwargs, content=False)
            kwargs = gather_batch(kwargs, self)
        if self.sf_sequence_calls is not None and not self.sf_batch_checked:
            self.sf_sequence_calls.validate(kwargs)
        if self.sf_config.check_batch and not self.sf_batch_checked:
            check_batch(self.sf_groups, args, kwargs)
        return run_forward(self, hf_forward, args, kwargs, takes_return_dict, self.sf_sequence_calls)

    takes_labels = "labels" in inspect.signature(hf_forward).parameters  # once, not per training step
    sharded = type(cls.__name__, (ShardedModelMixin, cls),
                   {"__module__": cls.__module__, "forward": forward, "sf_takes_labels": takes_labels})
    sharded.__qualname__ = cls.__qualname__
    return sharded


def _enable_checkpointing(model) -> None:
    """transformers' own activation checkpointing (its newer name first; 5.17 has only the old)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _own_config(model) -> None:
    """Give `model` a config object of its own (models built from one config share it), so that
    a setting changed for this sharded model does not change the others."""
    shared, own = model.config, copy.copy(model.config)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own


def _apply(model, plan, groups) -> None:
    """Apply every planned parallelism of `plan` (a `plan.LayoutPlan`) in the fixed order (local:
    no collective)."""
    config, policy = plan.config, plan.policy
    if config.enable_fused_kernels:
        apply_fused_kernels(model, policy, plan.kernels, list(plan.tp.attention_attrs),
                            choose_attention=config.sp_mode not in ("all_to_all", "ring"))
    tp_hooks = apply_tensor_parallel(model, plan.tp, policy, groups.tp, groups.mesh.get_local_rank("tp"))
    head = model.get_submodule(plan.tp.head_path) if plan.tp.head_path is not None else None
    calls = chunks = None
    if config.sp_mode == "split_gather":
        apply_split_gather(model, plan.sp, tp_hooks, groups.tp, groups.size("tp"), head)
    elif config.sp_mode in ("all_to_all", "ring"):
        _own_config(model)
        sp, sp_rank, zigzag = groups.size("sp"), groups.mesh.get_local_rank("sp"), config.sp_mode == "ring"
        chunks = SequenceChunks(sp, sp_rank, zigzag)
        lengths = apply_ulysses(model, plan.sp, groups, chunks)
        calls = SequenceCalls(groups.sp, sp, sp_rank, head is not None, zigzag=zigzag)
        if head is None:  # the whole sequence for the model's own outputs / heads
            final = model.get_submodule(plan.tp.base_path + policy.final_norm)
            final.register_forward_hook(gather_hidden_hook(calls, lengths[-1]))
    model.sf_sequence_calls = calls
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    model.sf_mesh, model.sf_groups, model.sf_config, model.sf_policy = groups.mesh, groups, config, policy
    object.__setattr__(model, "sf_lm_head", head)  # a reference, not a second registered submodule
    model.sf_fused_lm_loss = config.enable_fused_kernels and policy.fused_lm_loss and fused_loss_pays()
    model.sf_vocab_size = plan.tp.vocab_spec.full
    model.sf_batch_checked = False
    model.sf_checks_labels = head is not None
    model.sf_zero = None  # the sf.ZeroOptimizer wrapping this model's optimizer, once built
    model.sf_pipeline = None
    if plan.pp is not None:
        hf_forward = type(model).forward
        takes_return_dict = accepts_return_dict(hf_forward)
        # on the sp axis (calls, chunks) stages pass sequence chunks and the last one's loss is summed over sp
        model.sf_pipeline = apply_pipeline(
            model, plan.pp, groups,
            lambda view, call: run_forward(view, hf_forward, (), call, takes_return_dict, calls), chunks)
        if not model.sf_pipeline.has_last:
            object.__setattr__(model, "sf_lm_head", None)
    model.sf_grad_reducer = GradReducer(model, groups, reduce_data=config.zero_stage != 3)
    model.__class__ = _sharded_class(type(model))
    if config.zero_stage == 3:  # last: FSDP2 wraps the sharded class and its parameters
        runner = model.sf_pipeline
        apply_zero3(model, model.get_submodule(plan.tp.layers_path), groups, config.cpu_offload,
                    runner.modules if runner is not None else ())
        if runner is not None:
            runner.find_tied_param(model)  # FSDP2 put its own parameter in place
            runner.fsdp_dtype = model.sf_param_dtype  # FSDP2 computes in it (its shards: fp32 masters)
            if config.cpu_offload:  # the shards live on the CPU; FSDP2 computes on the mesh's device
                runner.fsdp_device = torch.device("cuda", torch.cuda.current_device()) \
                    if groups.mesh.device_type == "cuda" else torch.device("cpu")


def shard_model(model: torch.nn.Module, policy=None, config: ShardConfig | None = None) -> torch.nn.Module:
    """Shard `model` in place for this rank and return it.

    Args:
        model: an unmodified transformers model (from a config or `from_pretrained`).
        policy: a `shardformer.policies.Policy` (instance or class); None picks the registered
            policy for `model.config.model_type`, else derives one with `sf.infer_policy` (logged).
        config: the parallel layout; default `ShardConfig()` (no model parallelism, all ranks dp).

    Raises ValueError at setup when the layout cannot be built. Every rank must call it; a
    failure on any rank raises on every rank (the only collective before the error is the
    agreement on it).
    """
    from .plan import plan_layout  # here, not at import: `python -m shardformer.plan` runs that module as main

    world = require_process_group()
    error, plan = None, None
    try:
        config = ShardConfig() if config is None else config
        if not isinstance(config, ShardConfig):
            raise ValueError(f"shard_model(config=...) expects a shardformer.ShardConfig, got {type(config).__name__}")
        if getattr(model, "sf_mesh", None) is not None or isinstance(model, ShardedModelMixin):
            raise ValueError("this model is already sharded: shard_model may be applied once per model")
        if policy is None:  # the registered one, else one derived and checked (policies/infer.py)
            policy, notice = _policies.registered_or_inferred(model, config.tp_size)
            if notice and dist.get_rank() == 0:
                logger.warning(notice)
        else:
            policy = _policies.as_policy(policy)
        plan = plan_layout(model, policy, config, world)
    except Exception as err:  # noqa: BLE001 - raised on every rank by the agreement below
        error = err
    agree_on_failure(error, None, "shard_model")

    # Every check passed on every rank: from here on collectives run, in the same order everywhere.
    mesh = build_mesh(config)
    pp = plan.pp
    tied = (pp.owner(0), pp.owner(pp.stages - 1)) if pp is not None and pp.tied else None
    groups = build_groups(mesh, plan.tp.block_sizes, config.pipeline_timeout_s, tied)
    with all_or_none(None, "shard_model"):
        _apply(model, plan, groups)
    if dist.get_rank() == 0:
        logger.info(describe_layout(model, groups))
    return model
