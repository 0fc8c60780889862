"""The declarative policy type and the registry keyed by architecture (`config.model_type`).

A policy is data: which submodules are column / row / vocab parallel, where the embedding, the
decoder-layer list and the LM head are, and which config attributes count attention heads.
Authoring one for a new family means subclassing `Policy`, filling in the class attributes and
decorating the class with `@register_policy`; no engine code needs reading.
"""
from __future__ import annotations

from typing import ClassVar

_REGISTRY: dict[str, type["Policy"]] = {}


class Policy:
    """Base class of every policy. Paths are dotted attribute paths.

    Attributes:
        model_types: the `config.model_type` values served (the registry key).
        embedding: the token embedding, relative to `model.base_model` (vocab-parallel).
        layers: the decoder-layer `nn.ModuleList`, relative to `model.base_model`.
        lm_head: the output projection, relative to the top model (vocab-parallel, logits stay
            split); used when `model.get_output_embeddings()` is this module, and an error if the
            model has an output projection elsewhere.
        column_parallel: `nn.Linear`s in each layer whose output features are split.
        row_parallel: `nn.Linear`s in each layer whose input features are split.
        tp_input_copies: per layer, {module: column-parallel linears}: the module's output is the
            sole input of those linears, so it is handed to the tp group once there (one
            all-reduce of its gradient in backward) instead of once per linear.
        query_projections / kv_projections: which of `column_parallel` carry query heads and
            key/value heads (KV heads are replicated when tp exceeds their number).
        attention: the attention module in each layer.
        attention_local_attrs: attributes of the attention module to rewrite with the per-rank
            value; values are "q_heads", "kv_heads" or "groups" (q heads per KV head).
        num_heads_attr / num_kv_heads_attr: config attributes counting heads.
        loss: the loss installed as `model.loss_function` when the LM head is split.
        fused_norms / final_norm: RMSNorms in each layer / in the base model that the fused
            RMSNorm kernel may replace (with `ShardConfig.enable_fused_kernels`).
        fused_mlp: the gate/up/down MLP in each layer that the fused SwiGLU may replace.
        fused_rotary: route the family's `apply_rotary_pos_emb` to the fused rotary kernel
            (only when the CUDA extension is loaded).
        fused_lm_loss: in training with labels, compute the causal-LM loss with the fused
            linear + cross-entropy from the LM head's input (logits never materialised; the
            output's `logits` is then None). Only for heads whose logits go straight to the loss.
        optional: entries above allowed to match nothing in a given model.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    embedding: ClassVar[str] = "embed_tokens"
    layers: ClassVar[str] = "layers"
    lm_head: ClassVar[str] = "lm_head"
    column_parallel: ClassVar[tuple[str, ...]] = ()
    row_parallel: ClassVar[tuple[str, ...]] = ()
    tp_input_copies: ClassVar[dict[str, tuple[str, ...]]] = {}
    query_projections: ClassVar[tuple[str, ...]] = ()
    kv_projections: ClassVar[tuple[str, ...]] = ()
    attention: ClassVar[str] = "self_attn"
    attention_local_attrs: ClassVar[dict[str, str]] = {}
    num_heads_attr: ClassVar[str] = "num_attention_heads"
    num_kv_heads_attr: ClassVar[str] = "num_key_value_heads"
    loss: ClassVar[str] = "causal_lm"
    fused_norms: ClassVar[tuple[str, ...]] = ()
    final_norm: ClassVar[str | None] = None
    fused_mlp: ClassVar[str | None] = None
    fused_rotary: ClassVar[bool] = False
    fused_lm_loss: ClassVar[bool] = False
    optional: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}(model_types={self.model_types})"


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: serve every `cls.model_types` with `cls`."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__}.model_types is empty: name the config.model_type values it serves")
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(model) -> Policy:
    """The registered policy for `model` (looked up by `model.config.model_type`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"no shardformer policy for model.config.model_type={model_type!r} ({type(model).__name__}); "
            f"supported families: {', '.join(supported_model_types())}. To add one, subclass "
            "shardformer.policies.Policy, declare its embedding, layers, lm_head, column_parallel and "
            "row_parallel entries, decorate it with @shardformer.policies.register_policy, or pass it "
            "as shard_model(model, policy=YourPolicy())"
        )
    return _REGISTRY[model_type]()
