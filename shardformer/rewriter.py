"""Apply a policy to an unmodified HF model by substituting leaf modules.

Two phases, so that every error is raised before any collective:
  `plan_tensor_parallel(model, policy, tp)` resolves every policy entry and checks every
      divisibility; it raises ValueError naming the config field and the model attribute.
  `apply_tensor_parallel(model, plan, group, tp_rank)` swaps the modules (slicing the existing
      weights, so the sharded model starts identical to the unsharded one) and installs the
      vocab-parallel loss through the model's `loss_function` hook.
No HF forward is replaced: attention, decoder layers and the model run their own code on the
local heads (HF reshapes with -1 heads; `attention_local_attrs` fixes the per-rank counts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from torch import nn

from .layers.comm import copy_to_group
from .layers.embedding import VocabParallelEmbedding
from .layers.linear import ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead
from .layers.loss import causal_lm_loss
from .layers.shard import ShardSpec

LOSSES = {"causal_lm": causal_lm_loss}


@dataclass
class TensorParallelPlan:
    tp: int
    base_path: str  # "" or "<base_model_prefix>."
    layers_path: str
    embedding_path: str
    head_path: str | None
    tied: bool
    specs: dict[str, ShardSpec] = field(default_factory=dict)  # linear path -> spec of its weight
    kinds: dict[str, str] = field(default_factory=dict)  # linear path -> "column" | "row"
    attention_attrs: dict[str, dict[str, int]] = field(default_factory=dict)  # module path -> attrs
    input_copies: dict[str, list[str]] = field(default_factory=dict)  # producer path -> linear paths
    vocab_spec: ShardSpec | None = None


def _err(policy, entry: str, value, what: str) -> ValueError:
    return ValueError(f"policy {policy.name}.{entry}={value!r} {what}")


def resolve_entry(root: nn.Module, path: str, root_name: str, policy, entry: str, kind=nn.Module):
    """The submodule `path` of `root`, else a ValueError naming the policy entry and `root_name`."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        module = None
    if module is None or not isinstance(module, kind):
        found = "nothing" if module is None else type(module).__name__
        raise _err(policy, entry, path, f"matches {found} in {root_name}, expected {kind.__name__}")
    return module


def _div_error(tp: int, attr: str, value: int, config_field: str | None = None) -> ValueError:
    cfg = f" (model.config.{config_field})" if config_field else ""
    return ValueError(f"ShardConfig.tp_size={tp} does not divide model.{attr}={value}{cfg}")


def _kv_layout(tp: int, heads: int, kv_heads: int, policy) -> tuple[int, int]:
    """(distinct KV pieces, ranks per piece); replicate KV heads when tp exceeds them."""
    if heads % tp:
        raise _div_error(tp, f"config.{policy.num_heads_attr}", heads)
    if tp <= kv_heads:
        if kv_heads % tp:
            raise _div_error(tp, f"config.{policy.num_kv_heads_attr}", kv_heads)
        return tp, 1
    if tp % kv_heads:
        raise ValueError(
            f"ShardConfig.tp_size={tp} must divide, or be a multiple of, "
            f"model.config.{policy.num_kv_heads_attr}={kv_heads} to replicate KV heads"
        )
    return kv_heads, tp // kv_heads


def plan_tensor_parallel(model: nn.Module, policy, tp: int) -> TensorParallelPlan:
    """Resolve and validate everything; no collective, no change to the model."""
    config = model.config
    base = model.base_model
    base_prefix = next(name + "." if name else "" for name, m in model.named_modules() if m is base)
    base_name = type(base).__name__
    heads = getattr(config, policy.num_heads_attr)
    kv_heads = getattr(config, policy.num_kv_heads_attr, None) or heads
    kv_shards, kv_replicas = _kv_layout(tp, heads, kv_heads, policy)

    embedding = resolve_entry(base, policy.embedding, base_name, policy, "embedding", nn.Embedding)
    layers = resolve_entry(base, policy.layers, base_name, policy, "layers", nn.ModuleList)
    if len(layers) == 0:
        raise _err(policy, "layers", policy.layers, f"is empty in {base_name}")

    plan = TensorParallelPlan(tp, base_prefix, base_prefix + policy.layers, base_prefix + policy.embedding, None, False)
    VocabParallelEmbedding.check_supported(embedding, base_prefix + policy.embedding)
    vocab = embedding.num_embeddings
    if vocab < tp:
        raise ValueError(f"ShardConfig.tp_size={tp} exceeds model.config.vocab_size={vocab}")
    plan.vocab_spec = ShardSpec(0, vocab, tp)

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        head = resolve_entry(model, policy.lm_head, type(model).__name__, policy, "lm_head", nn.Linear)
        if head is not output:
            raise _err(policy, "lm_head", policy.lm_head, "is not model.get_output_embeddings()")
        if head.out_features != vocab:
            raise _err(policy, "lm_head", policy.lm_head, f"has {head.out_features} outputs, embedding has {vocab}")
        plan.head_path, plan.tied = policy.lm_head, head.weight is embedding.weight

    layers_path = plan.layers_path
    kv_set = set(policy.kv_projections)
    for i, layer in enumerate(layers):
        prefix = f"{layers_path}.{i}."
        for kind, entries in (("column", policy.column_parallel), ("row", policy.row_parallel)):
            entry_name = f"{kind}_parallel"
            for entry in entries:
                try:
                    linear = resolve_entry(layer, entry, f"{layers_path}.{i}", policy, entry_name, nn.Linear)
                except ValueError:
                    if entry in policy.optional:
                        continue
                    raise
                path = prefix + entry
                if kind == "row":
                    if linear.in_features % tp:
                        raise _div_error(tp, path + ".in_features", linear.in_features)
                    spec = ShardSpec(1, linear.in_features, tp)
                elif entry in kv_set:
                    if linear.out_features % kv_heads:
                        raise _err(policy, "kv_projections", entry, f"has {linear.out_features} outputs, "
                                   f"not a multiple of model.config.{policy.num_kv_heads_attr}={kv_heads}")
                    spec = ShardSpec(0, linear.out_features, kv_shards, kv_replicas)
                else:
                    if linear.out_features % tp:
                        raise _div_error(tp, path + ".out_features", linear.out_features)
                    spec = ShardSpec(0, linear.out_features, tp)
                plan.specs[path], plan.kinds[path] = spec, kind
        for owner, linears in policy.tp_input_copies.items():
            resolve_entry(layer, owner, f"{layers_path}.{i}", policy, "tp_input_copies")
            targets = [prefix + entry for entry in linears if prefix + entry in plan.specs]
            if any(plan.kinds[t] != "column" for t in targets) or not set(linears) <= set(policy.column_parallel):
                raise _err(policy, "tp_input_copies", owner, "must list column_parallel entries only")
            plan.input_copies[prefix + owner] = targets
        attention = resolve_entry(layer, policy.attention, f"{layers_path}.{i}", policy, "attention")
        local = {"q_heads": heads // tp, "kv_heads": kv_heads // kv_shards}
        local["groups"] = local["q_heads"] // local["kv_heads"]
        attrs = {}
        for attr, what in policy.attention_local_attrs.items():
            if not hasattr(attention, attr):
                raise _err(policy, "attention_local_attrs", attr, f"is no attribute of {type(attention).__name__}")
            attrs[attr] = local[what]
        plan.attention_attrs[prefix + policy.attention] = attrs
    return plan


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at the dotted `path` of `model`."""
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def _copy_output_to(group):
    """Forward hook: hand the module's output to the tp group (gradient all-reduced in backward)."""

    def hook(module, args, output):
        return copy_to_group(output, group)

    return hook


def apply_tensor_parallel(model: nn.Module, plan: TensorParallelPlan, policy, group, tp_rank: int) -> None:
    """Substitute the planned modules (see module docstring)."""
    for path, spec in plan.specs.items():
        cls = ColumnParallelLinear if plan.kinds[path] == "column" else RowParallelLinear
        replace_module(model, path, cls.from_linear(model.get_submodule(path), spec, group, tp_rank))
    for owner, linears in plan.input_copies.items():
        model.get_submodule(owner).register_forward_hook(_copy_output_to(group))
        for path in linears:
            model.get_submodule(path).copy_input = False
    for path, attrs in plan.attention_attrs.items():
        attention = model.get_submodule(path)
        for attr, value in attrs.items():
            setattr(attention, attr, value)

    embedding = VocabParallelEmbedding.from_embedding(
        model.get_submodule(plan.embedding_path), plan.vocab_spec, group, tp_rank
    )
    replace_module(model, plan.embedding_path, embedding)
    if plan.head_path is not None:
        shared = embedding.weight if plan.tied else None
        head = VocabParallelLMHead.from_linear(
            model.get_submodule(plan.head_path), plan.vocab_spec, group, tp_rank, weight=shared
        )
        replace_module(model, plan.head_path, head)
        model.loss_function = partial(LOSSES[policy.loss], head=head)
