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
        position_embedding: learned positions the base model adds to `inputs_embeds` (GPT-2's
            `wpe`), relative to `model.base_model`; replicated. Pipeline parallelism is refused
            for them (a later stage, fed hidden states as `inputs_embeds`, would add them again).
        layers: the decoder-layer `nn.ModuleList`, relative to `model.base_model`.
        lm_head: the output projection, relative to the top model (vocab-parallel, logits stay
            split); used when `model.get_output_embeddings()` is this module, and an error if the
            model has an output projection elsewhere.
        column_parallel: `nn.Linear`s (or transformers' `Conv1D`s) in each layer whose output
            features are split.
        row_parallel: `nn.Linear`s (or `Conv1D`s) in each layer whose input features are split.
        tp_input_copies: per layer, {module: column-parallel linears}: the module's output is the
            sole input of those linears, so it is handed to the tp group once there (one
            all-reduce of its gradient in backward) instead of once per linear.
        query_projections / kv_projections: which of `column_parallel` carry query heads and
            key/value heads (KV heads are replicated when tp exceeds their number).
        packed: {`column_parallel` entry: config attributes}: a fused projection whose outputs
            pack several parts (Phi-3's q/k/v, gate/up), sized in proportion to those config
            attributes' values (e.g. ("num_attention_heads", "num_key_value_heads",
            "num_key_value_heads")); each part is split over tp on its own, so each rank's
            output holds its own share of every part in HF's order. Each attribute's value must
            divide by tp (KV heads packed with queries are not replicated).
        tp_partial: modules in each layer whose parameters stay whole on every tp rank but see
            only this rank's heads (e.g. per-head q / k norms): their gradients are summed over
            the tp group.
        split_norms: {RMSNorm in each layer: the column_parallel entry whose output it
            normalises}: a norm over all heads' features together (OLMo 2's `q_norm` / `k_norm`
            over the whole query / key projection), so over features split over tp. Its weight
            is split as that linear's outputs and each row's sum of squares is all-reduced over
            tp (`shardformer/tensor_parallel/norm.py`); the module's formula is checked at setup.
        attention: the attention module in each layer.
        attention_local_attrs: attributes of the attention module to rewrite with the per-rank
            value; values are "q_heads", "kv_heads", "groups" (q heads per KV head) or "q_width"
            (q heads x head size: GPT-2's `split_size`).
        attention_local_config: config attributes the attention module reads from its own
            `config` in forward (Phi-3's `num_attention_heads`), with the same kinds of values:
            the module gets a view of the model's config holding the per-rank values.
        num_heads_attr / num_kv_heads_attr: config attributes counting heads.
        embedding_scale: an attribute of the token embedding (a number) by which HF multiplies
            its lookup (Gemma's scaled word embedding: "scalar_embed_scale"); the vocab-parallel
            embedding keeps the multiplication. An `nn.Embedding` subclass with its own forward
            and no such entry is refused.
        loss: the loss installed as `model.loss_function` when the LM head is split.
        fused_norms / final_norm: RMSNorms in each layer / in the base model that the fused
            RMSNorm kernel may replace (with `ShardConfig.enable_fused_kernels`); `final_norm`
            also marks where sequence and pipeline parallelism find the final norm.
        fused_final_norm: whether the fused RMSNorm may replace `final_norm` (False for a norm
            of another formula, e.g. Gemma's `(1 + weight)`).
        whole_sequence_output: the base model reshapes the final norm's output to the input's
            sequence length (GPT-2's `view(output_shape)`): the sp-axis modes (all_to_all, ring),
            which keep it a sequence chunk for the LM head, are refused.
        fused_mlp: the gate/up/down MLP in each layer that the fused SwiGLU may replace.
        fused_rotary: route the family's `apply_rotary_pos_emb` to the fused rotary kernel in
            the sharded model's attention (only when the CUDA extension is loaded).
        fused_lm_loss: in training with labels, compute the causal-LM loss with the fused
            linear + cross-entropy from the LM head's input (logits never materialised; the
            output's `logits` is then None). Only for heads whose logits go straight to the loss.
        logit_transforms: config attributes naming an elementwise transform HF applies between
            the LM head and the loss (Gemma's `final_logit_softcapping`); while one of them is set
            (not None) the fused LM loss is not used (it would skip the transform).
        experts: {module in each layer: {3-D parameter: "column" | "row"}}: HF's stacked experts
            (`@use_experts_implementation`: every expert's weights in one [experts, out, in]
            tensor, Mixtral's `mlp.experts`). Each expert's intermediate dimension is split over tp
            ("column": its outputs, "row": its inputs; swapped for the module's `is_transposed`); a
            packed column parameter is listed in `packed` as "<module>.<parameter>". The module's
            own forward (any `experts_implementation`) runs on the local pieces; its floating-point
            inputs (hidden states, routing weights) are handed to the tp group and its output is
            all-reduced, as around a row-parallel linear. The router stays replicated.
        loss_terms: boolean config attributes that make HF's forward add further terms to the LM
            loss (Mixtral's router aux loss: "output_router_logits"): while one is true the fused
            LM loss is not used, and pipelines / sp-axis sequence parallelism are refused (the
            term needs every layer's and every token's router output on one rank).
        gathered_lm_head: the model computes its loss from the logits itself (BERT's masked-LM
            `CrossEntropyLoss`): the vocab-parallel LM head gathers them to the full vocabulary in
            forward (backward keeps this rank's slice) and no vocab-parallel loss is installed.
        refused: {ShardConfig field: why}: a value other than the field's default is refused at
            setup with that reason (a parallelism the family does not support).
        optional: entries above allowed to match nothing in a given model.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    embedding: str = "embed_tokens"
    position_embedding: str | None = None
    layers: str = "layers"
    lm_head: str = "lm_head"
    column_parallel: tuple[str, ...] = ()
    row_parallel: tuple[str, ...] = ()
    tp_input_copies: FrozenDict = FrozenDict()
    query_projections: tuple[str, ...] = ()
    kv_projections: tuple[str, ...] = ()
    packed: FrozenDict = FrozenDict()
    tp_partial: tuple[str, ...] = ()
    split_norms: FrozenDict = FrozenDict()
    attention: str = "self_attn"
    attention_local_attrs: FrozenDict = FrozenDict()
    attention_local_config: FrozenDict = FrozenDict()
    embedding_scale: str | None = None
    num_heads_attr: str = "num_attention_heads"
    num_kv_heads_attr: str = "num_key_value_heads"
    loss: str = "causal_lm"
    fused_norms: tuple[str, ...] = ()
    final_norm: str | None = None
    fused_final_norm: bool = True
    whole_sequence_output: bool = False
    fused_mlp: str | None = None
    fused_rotary: bool = False
    fused_lm_loss: bool = False
    logit_transforms: tuple[str, ...] = ()
    experts: FrozenDict = FrozenDict()
    loss_terms: tuple[str, ...] = ()
    gathered_lm_head: bool = False
    refused: FrozenDict = FrozenDict()
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

    # Fields printed by `to_source` even when they keep Policy's default (a reader sees the split).
    _SOURCE_ALWAYS = ("model_types", "embedding", "layers", "lm_head", "column_parallel", "row_parallel")

    def to_source(self, doc: str | None = None) -> str:
        """This policy as Python source to save and edit: a `@register_policy` subclass of Policy
        named after `self.name`, setting every field that differs from Policy's default (and
        the main ones always); `doc` becomes its docstring. Exec'd, it builds an equal policy."""
        import pprint

        lines = ["from shardformer.policies import Policy, register_policy", "", "", "@register_policy",
                 f"class {self.name}(Policy):"]
        if doc:
            lines.append(f'    """{doc}"""')
        for f in dataclasses.fields(Policy):
            value = getattr(self, f.name)
            if f.name == "name" or (value == f.default and f.name not in self._SOURCE_ALWAYS):
                continue
            plain = dict(value) if isinstance(value, FrozenDict) else value
            text = pprint.pformat(plain, width=96 - 7 - len(f.name), sort_dicts=False)
            lines.append(f"    {f.name} = " + text.replace("\n", "\n" + " " * (7 + len(f.name))))
        return "\n".join(lines) + "\n"


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
