"""The declarative policy type and the registry keyed by architecture (`config.model_type`).

A policy is data: which submodules are column / row / vocab parallel, where the embedding, the
decoder-layer list and the LM head are, and which config attributes count attention heads.
Policies are frozen dataclass instances, so they can be built at run time
(`Policy(model_types=("x",), column_parallel=(...), ...)` or
`dataclasses.replace(LlamaPolicy(), fused_mlp=None)`). A family is also written as a subclass
that overrides field defaults with plain class attributes (it becomes a dataclass by itself):

    @register_policy
    class MyPolicy(Policy):
        model_types = ("my_model",)
        column_parallel = ("self_attn.q_proj", ...)

No engine code needs reading.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from torch import nn

_REGISTRY: dict[str, "Policy"] = {}


class FrozenDict(dict):
    """A read-only, hashable dict (policy fields that map names to names)."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("policy mappings are read-only; build a new policy with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):
        return FrozenDict, (dict(self),)


def _frozen(value):
    """Lists become tuples and dicts FrozenDicts (recursively), so that policies stay immutable."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict) and not isinstance(value, FrozenDict):
        return FrozenDict({k: _frozen(v) for k, v in value.items()})
    return value


@dataclass(frozen=True)
class Policy:
    """Base of every policy. Paths are dotted attribute paths.

    Attributes:
        name: shown in errors; defaults to the class name.
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
        tp_partial: modules in each layer whose parameters stay whole on every tp rank but see
            only this rank's heads (e.g. per-head q / k norms): their gradients are summed over
            the tp group.
        attention: the attention module in each layer.
        attention_local_attrs: attributes of the attention module to rewrite with the per-rank
            value; values are "q_heads", "kv_heads" or "groups" (q heads per KV head).
        num_heads_attr / num_kv_heads_attr: config attributes counting heads.
        loss: the loss installed as `model.loss_function` when the LM head is split.
        fused_norms / final_norm: RMSNorms in each layer / in the base model that the fused
            RMSNorm kernel may replace (with `ShardConfig.enable_fused_kernels`).
        fused_mlp: the gate/up/down MLP in each layer that the fused SwiGLU may replace.
        fused_rotary: route the family's `apply_rotary_pos_emb` to the fused rotary kernel in
            the sharded model's attention (only when the CUDA extension is loaded).
        fused_lm_loss: in training with labels, compute the causal-LM loss with the fused
            linear + cross-entropy from the LM head's input (logits never materialised; the
            output's `logits` is then None). Only for heads whose logits go straight to the loss.
        optional: entries above allowed to match nothing in a given model.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    embedding: str = "embed_tokens"
    layers: str = "layers"
    lm_head: str = "lm_head"
    column_parallel: tuple[str, ...] = ()
    row_parallel: tuple[str, ...] = ()
    tp_input_copies: FrozenDict = FrozenDict()
    query_projections: tuple[str, ...] = ()
    kv_projections: tuple[str, ...] = ()
    tp_partial: tuple[str, ...] = ()
    attention: str = "self_attn"
    attention_local_attrs: FrozenDict = FrozenDict()
    num_heads_attr: str = "num_attention_heads"
    num_kv_heads_attr: str = "num_key_value_heads"
    loss: str = "causal_lm"
    fused_norms: tuple[str, ...] = ()
    final_norm: str | None = None
    fused_mlp: str | None = None
    fused_rotary: bool = False
    fused_lm_loss: bool = False
    optional: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        """A subclass's plain class attributes become its field defaults (it is made a frozen
        dataclass itself), so `column_parallel = (...)` in a subclass body means what it says."""
        super().__init_subclass__(**kwargs)
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for f in dataclasses.fields(Policy):
            if f.name in cls.__dict__:
                setattr(cls, f.name, _frozen(cls.__dict__[f.name]))
                annotations.setdefault(f.name, f.type)
        cls.__annotations__ = annotations
        dataclass(frozen=True, repr=False)(cls)

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", type(self).__name__)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _frozen(getattr(self, f.name)))

    def __repr__(self) -> str:
        return f"{self.name}(model_types={self.model_types})"

    def entry_error(self, entry: str, value, what: str) -> ValueError:
        """A ValueError naming this policy's `entry` and its `value`."""
        return ValueError(f"policy {self.name}.{entry}={value!r} {what}")

    def resolve(self, root: nn.Module, path: str, root_name: str, entry: str, kind=nn.Module) -> nn.Module:
        """The submodule `path` of `root`, else a ValueError naming the policy entry and `root_name`."""
        try:
            module = root.get_submodule(path)
        except AttributeError:
            module = None
        if module is None or not isinstance(module, kind):
            found = "nothing" if module is None else type(module).__name__
            raise self.entry_error(entry, path, f"matches {found} in {root_name}, expected {kind.__name__}")
        return module

    @staticmethod
    def replace(model: nn.Module, path: str, new: nn.Module) -> None:
        """Put `new` at the dotted `path` of `model`."""
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def register_policy(policy):
    """Serve every `policy.model_types` with `policy` (a Policy subclass, usable as a class
    decorator, or an instance built at run time); returns its argument."""
    instance = policy() if isinstance(policy, type) else policy
    if not isinstance(instance, Policy):
        raise ValueError(f"register_policy expects a shardformer.policies.Policy, got {policy!r}")
    if not instance.model_types:
        raise ValueError(f"{instance.name}.model_types is empty: name the config.model_type values it serves")
    for model_type in instance.model_types:
        _REGISTRY[model_type] = instance
    return policy


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def as_policy(policy) -> Policy:
    """A Policy instance from an instance or a Policy subclass; ValueError otherwise."""
    if isinstance(policy, type) and issubclass(policy, Policy):
        policy = policy()
    if not isinstance(policy, Policy):
        raise ValueError(f"shard_model(policy=...) expects a shardformer.policies.Policy, got {policy!r}")
    return policy


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
    return _REGISTRY[model_type]
