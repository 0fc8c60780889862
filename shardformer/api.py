"""`shard_model`: turn an unmodified HF model into this rank's shard of a parallel model.

The model object itself is sharded in place and returned: its class becomes a subclass of the
original (same name) that adds `forward_backward`, `clip_grad_norm_` and `no_sync`; `forward`
is still the HF call with the HF output, parameter names are unchanged, `generate` still works.
The subclass's `forward` wraps the HF one (same signature) to run shardformer's output
handling (logits gather, fused loss), so `model(...)` and `model.forward(...)` behave the same.
Everything that can be wrong is checked before the first collective.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from . import policies as _policies
from .config import ShardConfig
from .data_parallel import GradReducer
from .grad_clip import clip_grad_norm_
from .kernels.apply import apply_fused_kernels
from .kernels.fused_loss import install_fused_lm_loss
from .layers.comm import all_reduce_no_grad
from .layers.linear import VocabParallelLMHead
from .mesh import build_mesh, check_world, require_process_group
from .rewriter import apply_tensor_parallel, plan_tensor_parallel


class ShardedModelMixin:
    """Methods added to a sharded model. State lives in `sf_mesh`, `sf_config`, `sf_policy`."""

    def forward_backward(self, **batch) -> torch.Tensor:
        """Forward and backward on this rank's batch; returns the loss averaged over dp (detached),
        the same value on every rank. Gradients are reduced across replicas when it returns."""
        out = self(**batch)
        loss = out.loss if hasattr(out, "loss") else out[0]
        if loss is None:
            raise ValueError("forward_backward needs a batch that makes the model return a loss (pass labels)")
        loss.backward()
        dp_group = self.sf_mesh.get_group("dp")
        return all_reduce_no_grad(loss.detach().clone(), dp_group, "sum") / dist.get_world_size(dp_group)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip all gradients by the global norm of the unsharded model's gradient; returns it."""
        return clip_grad_norm_(self, max_norm, self.sf_mesh.get_group("tp"), norm_type)

    def no_sync(self):
        """Context manager: skip the cross-replica gradient reduction (gradient accumulation)."""
        return self.sf_grad_reducer.no_sync()


def _sharded_class(cls: type) -> type:
    """A subclass of `cls` with the same name whose forward runs `model.sf_pre_hooks` /
    `sf_post_hooks` (same calling convention as nn.Module forward hooks with kwargs) around it."""
    base_forward = cls.forward

    @functools.wraps(base_forward)
    def forward(self, *args, **kwargs):
        for hook in self.sf_pre_hooks:
            changed = hook(self, args, kwargs)
            if changed is not None:
                args, kwargs = changed
        output = base_forward(self, *args, **kwargs)
        for hook in self.sf_post_hooks:
            changed = hook(self, args, kwargs, output)
            if changed is not None:
                output = changed
        return output

    sharded = type(cls.__name__, (ShardedModelMixin, cls), {"__module__": cls.__module__, "forward": forward})
    sharded.__qualname__ = cls.__qualname__
    return sharded


def _gather_logits_without_labels(head: VocabParallelLMHead):
    """Post hook: an output without labels (inference, generate) gets full-vocabulary logits;
    with labels, logits stay vocab-split (this rank's slice), so training never gathers them."""

    def hook(module, args, kwargs, output):
        if kwargs.get("labels") is not None or getattr(head, "sf_pending", None) is not None:
            return output  # labels given (or taken by the fused loss): logits stay split
        if isinstance(output, tuple):  # return_dict=False without labels: logits come first
            return (head.gather_logits(output[0]),) + output[1:] if output and output[0] is not None else output
        if getattr(output, "logits", None) is None:
            return output
        output.logits = head.gather_logits(output.logits)
        return output

    return hook


def _enable_checkpointing(model) -> None:
    """transformers' own activation checkpointing (its newer name first; 5.17 has only the old)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard_model(model: torch.nn.Module, policy=None, config: ShardConfig | None = None) -> torch.nn.Module:
    """Shard `model` in place for this rank and return it.

    Args:
        model: an unmodified transformers model (from a config or `from_pretrained`).
        policy: a `shardformer.policies.Policy` (instance or class); None picks the registered
            policy for `model.config.model_type`.
        config: the parallel layout; default `ShardConfig()` (no model parallelism, all ranks dp).

    Raises ValueError, before any collective, when the layout cannot be built.
    """
    config = ShardConfig() if config is None else config
    if not isinstance(config, ShardConfig):
        raise ValueError(f"shard_model(config=...) expects a shardformer.ShardConfig, got {type(config).__name__}")
    if getattr(model, "sf_mesh", None) is not None or isinstance(model, ShardedModelMixin):
        raise ValueError("this model is already sharded: shard_model may be applied once per model")
    if policy is None:
        policy = _policies.get_policy(model)
    elif isinstance(policy, type):
        policy = policy()
    if not isinstance(policy, _policies.Policy):
        raise ValueError(f"shard_model(policy=...) expects a shardformer.policies.Policy, got {policy!r}")
    world = require_process_group()
    check_world(config, world)
    plan = plan_tensor_parallel(model, policy, config.tp_size)
    if config.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"ShardConfig.gradient_checkpointing=True but {type(model).__name__}.supports_gradient_checkpointing is False"
        )
    if config.enable_fused_kernels:
        apply_fused_kernels(model, policy, plan.layers_path, plan.base_path)

    # From here on collectives may run: every check above passed on every rank.
    mesh = build_mesh(config)
    tp_group = mesh.get_group("tp")
    apply_tensor_parallel(model, plan, policy, tp_group, mesh.get_local_rank("tp"))
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    model.sf_mesh, model.sf_config, model.sf_policy = mesh, config, policy
    model.sf_grad_reducer = GradReducer(model, mesh)
    model.sf_pre_hooks, model.sf_post_hooks = [], []
    if plan.head_path is not None:
        head = model.get_submodule(plan.head_path)
        model.sf_post_hooks.append(_gather_logits_without_labels(head))
        if config.enable_fused_kernels and policy.fused_lm_loss:
            install_fused_lm_loss(model, head)
    model.__class__ = _sharded_class(type(model))
    return model
