"""Tensor-parallel planning: resolve every policy entry and check every divisibility against
the model, with no collective and no change to the model. Raises ValueError naming the config
field and the model attribute (or the policy entry)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..sharding import ShardSpec
from .embedding import VocabParallelEmbedding
from .experts import plan_experts
from .linear import weight_layout
from .norm import rms_norm_form


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
    attention_config: dict[str, dict[str, int]] = field(default_factory=dict)  # module path -> config attrs
    input_copies: dict[str, list[str]] = field(default_factory=dict)  # producer path -> linear paths
    partial_modules: list[str] = field(default_factory=list)  # whole on every rank, gradients summed over tp
    experts: dict[str, dict[str, ShardSpec]] = field(default_factory=dict)  # experts module path -> {param: spec}
    split_norms: dict[str, tuple[ShardSpec, tuple[float, bool]]] = field(default_factory=dict)  # path -> (spec, form)
    vocab_spec: ShardSpec | None = None
    embedding_scale: float | None = None  # the embedding's output multiplier (Policy.embedding_scale)

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


def _linear_spec(policy, config, tp: int, kind: str, entry: str, path: str, layout, kv) -> ShardSpec:
    """How one planned linear's weight is split: row-parallel along its input features,
    column-parallel along its outputs (per part when packed; over the KV layout `kv` = (KV heads,
    distinct pieces, ranks per piece) for KV projections). `layout`: `weight_layout(linear)`."""
    in_features, out_features, transposed = layout
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    if kind == "row":
        if in_features % tp:
            raise _div_error(tp, path + ".in_features", in_features)
        return ShardSpec(in_dim, in_features, tp)
    if entry in policy.packed:
        return _packed_spec(config, policy, tp, entry, path, out_features, out_dim)
    if entry in policy.kv_projections:
        kv_heads, kv_shards, kv_replicas = kv
        if out_features % kv_heads:
            raise policy.entry_error("kv_projections", entry, f"has {out_features} outputs, "
                                     f"not a multiple of model.config.{policy.num_kv_heads_attr}={kv_heads}")
        return ShardSpec(out_dim, out_features, kv_shards, kv_replicas, partial=kv_replicas > 1)
    if out_features % tp:
        raise _div_error(tp, path + ".out_features", out_features)
    return ShardSpec(out_dim, out_features, tp)


def _packed_spec(config, policy, tp: int, entry: str, path: str, out_features: int, dim: int) -> ShardSpec:
    """The spec of a fused projection (`Policy.packed`): its output parts sized in proportion to
    the named config attributes, each split over tp on its own."""
    attrs = policy.packed[entry]
    values = []
    for attr in attrs:
        value = getattr(config, attr, None)
        if not isinstance(value, int) or value <= 0:
            raise policy.entry_error("packed", {entry: attrs}, f"names model.config.{attr}={value!r}, not a positive int")
        if value % tp:
            raise ValueError(f"ShardConfig.tp_size={tp} does not divide model.config.{attr}={value}, packed in "
                             f"model.{path} ({policy.name}.packed): the parts of a fused projection are split over "
                             "tp, never replicated; use a tp_size that divides it")
        values.append(value)
    if out_features % sum(values):
        raise policy.entry_error("packed", {entry: attrs}, f"does not match model.{path}: {out_features} outputs are "
                                 f"not a multiple of {' + '.join(map(str, values))}")
    unit = out_features // sum(values)
    return ShardSpec(dim, out_features, tp, parts=tuple(v * unit for v in values))


def _embedding_scale(embedding: nn.Embedding, policy, path: str) -> float | None:
    """The number HF multiplies the embedding's lookup by (`Policy.embedding_scale`), as fp32
    (HF keeps it in an fp32 buffer); refuses an embedding whose own forward the policy does not
    describe (the vocab-parallel embedding would silently drop what it does)."""
    if policy.embedding_scale is None:
        if type(embedding).forward is not nn.Embedding.forward:
            raise policy.entry_error("embedding_scale", None, f"is not set, but model.{path} is a "
                                     f"{type(embedding).__name__} with its own forward (what it does beyond the "
                                     "lookup would be lost); name the attribute holding its output scale")
        return None
    value = getattr(embedding, policy.embedding_scale, None)
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_meta:
        value = value.item()
    if not isinstance(value, (int, float)):
        raise policy.entry_error("embedding_scale", policy.embedding_scale,
                                 f"is no number on model.{path} ({type(embedding).__name__}): got {value!r}")
    return float(torch.tensor(value, dtype=torch.float32))


def _plan_split_norms(plan: TensorParallelPlan, policy, layer: nn.Module, prefix: str, layer_name: str) -> None:
    """`Policy.split_norms` of one layer: each norm's weight split as the outputs of the column
    linear it normalises (same spec, KV replicas included), its formula checked (`rms_norm_form`)."""
    for entry, linear in policy.split_norms.items():
        try:
            norm = policy.resolve(layer, entry, layer_name, "split_norms")
        except ValueError:
            if entry in policy.optional:
                continue
            raise
        spec = plan.specs.get(prefix + linear)
        if spec is None or plan.kinds[prefix + linear] != "column":
            raise policy.entry_error("split_norms", {entry: linear}, f"names {linear}, not a column_parallel entry "
                                     f"of {layer_name}")
        if spec.parts:
            raise policy.entry_error("split_norms", {entry: linear}, f"names the packed projection {linear}: a norm "
                                     "over packed parts is not supported")
        weight = getattr(norm, "weight", None)
        if weight is None or tuple(weight.shape) != (spec.full,):
            shape = None if weight is None else tuple(weight.shape)
            raise policy.entry_error("split_norms", {entry: linear}, f"normalises {shape} features in model.{prefix}"
                                     f"{entry}, but model.{prefix}{linear} has {spec.full} outputs")
        try:
            form = rms_norm_form(norm, prefix + entry)
        except ValueError as err:
            raise policy.entry_error("split_norms", {entry: linear}, str(err)) from None
        plan.split_norms[prefix + entry] = (spec, form)


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
    plan.embedding_scale = _embedding_scale(embedding, policy, base_prefix + policy.embedding)
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
    expert_params = {f"{entry}.{name}" for entry, params in policy.experts.items() for name in params}
    stray = sorted(set(policy.packed) - set(policy.column_parallel) - expert_params)
    if stray:
        raise policy.entry_error("packed", stray[0], "is not a column_parallel entry")
    for i, layer in enumerate(layers):
        prefix = f"{layers_path}.{i}."
        for kind, entries in (("column", policy.column_parallel), ("row", policy.row_parallel)):
            entry_name = f"{kind}_parallel"
            for entry in entries:
                try:
                    linear = policy.resolve(layer, entry, f"{layers_path}.{i}", entry_name)
                    layout = weight_layout(linear)
                    if layout is None:
                        raise policy.entry_error(entry_name, entry, f"matches {type(linear).__name__} in "
                                                 f"{layers_path}.{i}, expected nn.Linear or Conv1D")
                except ValueError:
                    if entry in policy.optional:
                        continue
                    raise
                path = prefix + entry
                spec = _linear_spec(policy, config, tp, kind, entry, path, layout, (kv_heads, kv_shards, kv_replicas))
                plan.specs[path], plan.kinds[path] = spec, kind
        for owner, linears in policy.tp_input_copies.items():
            policy.resolve(layer, owner, f"{layers_path}.{i}", "tp_input_copies")
            targets = [prefix + entry for entry in linears if prefix + entry in plan.specs]
            if any(plan.kinds[t] != "column" for t in targets) or not set(linears) <= set(policy.column_parallel):
                raise policy.entry_error("tp_input_copies", owner, "must list column_parallel entries only")
            plan.input_copies[prefix + owner] = targets
        for entry in policy.experts:
            try:
                module = policy.resolve(layer, entry, f"{layers_path}.{i}", "experts")
            except ValueError:
                if entry in policy.optional:
                    continue
                raise
            plan.experts[prefix + entry] = plan_experts(module, entry, prefix + entry, policy, config, tp)
        for entry in policy.tp_partial:
            try:
                policy.resolve(layer, entry, f"{layers_path}.{i}", "tp_partial")
            except ValueError:
                if entry in policy.optional:
                    continue
                raise
            plan.partial_modules.append(prefix + entry)
        _plan_split_norms(plan, policy, layer, prefix, f"{layers_path}.{i}")
        attention = policy.resolve(layer, policy.attention, f"{layers_path}.{i}", "attention")
        local = {"q_heads": heads // tp, "kv_heads": kv_heads // kv_shards}
        local["groups"] = local["q_heads"] // local["kv_heads"]
        head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
        local["q_width"] = local["q_heads"] * head_dim
        attrs = {}
        for attr, what in policy.attention_local_attrs.items():
            if not hasattr(attention, attr):
                raise policy.entry_error("attention_local_attrs", attr,
                                         f"is no attribute of {type(attention).__name__}")
            attrs[attr] = local[what]
        plan.attention_attrs[prefix + policy.attention] = attrs
        if policy.attention_local_config:
            own = getattr(attention, "config", None)
            missing = [attr for attr in policy.attention_local_config if not hasattr(own, attr)]
            if missing:
                raise policy.entry_error("attention_local_config", missing[0],
                                         f"is no attribute of {type(attention).__name__}.config")
            plan.attention_config[prefix + policy.attention] = {
                attr: local[what] for attr, what in policy.attention_local_config.items()}
    return plan
