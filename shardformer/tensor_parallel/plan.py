"""Tensor-parallel planning: resolve every policy entry and check every divisibility against
the model, with no collective and no change to the model. Raises ValueError naming the config
field and the model attribute (or the policy entry)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..sharding import ShardSpec
from .embedding import VocabParallelEmbedding


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
    partial_modules: list[str] = field(default_factory=list)  # whole on every rank, gradients summed over tp
    vocab_spec: ShardSpec | None = None

    @property
    def block_sizes(self) -> set[int]:
        """Replica counts of parameters whose gradient is partial over a block of tp ranks."""
        return {spec.replicas for spec in self.specs.values() if spec.partial}


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

    embedding = policy.resolve(base, policy.embedding, base_name, "embedding", nn.Embedding)
    layers = policy.resolve(base, policy.layers, base_name, "layers", nn.ModuleList)
    if len(layers) == 0:
        raise policy.entry_error("layers", policy.layers, f"is empty in {base_name}")

    plan = TensorParallelPlan(tp, base_prefix, base_prefix + policy.layers, base_prefix + policy.embedding, None, False)
    VocabParallelEmbedding.check_supported(embedding, base_prefix + policy.embedding)
    vocab = embedding.num_embeddings
    if vocab < tp:
        raise ValueError(f"ShardConfig.tp_size={tp} exceeds model.config.vocab_size={vocab}")
    plan.vocab_spec = ShardSpec(0, vocab, tp)

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        head = policy.resolve(model, policy.lm_head, type(model).__name__, "lm_head", nn.Linear)
        if head is not output:
            raise policy.entry_error("lm_head", policy.lm_head, "is not model.get_output_embeddings()")
        if head.out_features != vocab:
            raise policy.entry_error("lm_head", policy.lm_head, f"has {head.out_features} outputs, embedding has {vocab}")
        plan.head_path, plan.tied = policy.lm_head, head.weight is embedding.weight

    layers_path = plan.layers_path
    kv_set = set(policy.kv_projections)
    for i, layer in enumerate(layers):
        prefix = f"{layers_path}.{i}."
        for kind, entries in (("column", policy.column_parallel), ("row", policy.row_parallel)):
            entry_name = f"{kind}_parallel"
            for entry in entries:
                try:
                    linear = policy.resolve(layer, entry, f"{layers_path}.{i}", entry_name, nn.Linear)
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
                        raise policy.entry_error("kv_projections", entry, f"has {linear.out_features} outputs, "
                                                 f"not a multiple of model.config.{policy.num_kv_heads_attr}={kv_heads}")
                    spec = ShardSpec(0, linear.out_features, kv_shards, kv_replicas, partial=kv_replicas > 1)
                else:
                    if linear.out_features % tp:
                        raise _div_error(tp, path + ".out_features", linear.out_features)
                    spec = ShardSpec(0, linear.out_features, tp)
                plan.specs[path], plan.kinds[path] = spec, kind
        for owner, linears in policy.tp_input_copies.items():
            policy.resolve(layer, owner, f"{layers_path}.{i}", "tp_input_copies")
            targets = [prefix + entry for entry in linears if prefix + entry in plan.specs]
            if any(plan.kinds[t] != "column" for t in targets) or not set(linears) <= set(policy.column_parallel):
                raise policy.entry_error("tp_input_copies", owner, "must list column_parallel entries only")
            plan.input_copies[prefix + owner] = targets
        for entry in policy.tp_partial:
            try:
                policy.resolve(layer, entry, f"{layers_path}.{i}", "tp_partial")
            except ValueError:
                if entry in policy.optional:
                    continue
                raise
            plan.partial_modules.append(prefix + entry)
        attention = policy.resolve(layer, policy.attention, f"{layers_path}.{i}", "attention")
        local = {"q_heads": heads // tp, "kv_heads": kv_heads // kv_shards}
        local["groups"] = local["q_heads"] // local["kv_heads"]
        attrs = {}
        for attr, what in policy.attention_local_attrs.items():
            if not hasattr(attention, attr):
                raise policy.entry_error("attention_local_attrs", attr,
                                         f"is no attribute of {type(attention).__name__}")
            attrs[attr] = local[what]
        plan.attention_attrs[prefix + policy.attention] = attrs
    return plan
