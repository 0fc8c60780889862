"""`infer_policy(model)`: a Policy derived for a model that has none, checked before use.

Where the split comes from: the model config's `base_model_tp_plan` (transformers' own
tensor-parallel hints), translated entry by entry:
    "colwise" -> column_parallel, "rowwise" -> row_parallel,
    "replicated_with_grad_allreduce" -> tp_partial (whole on every rank, gradients summed),
    "embedding_rowwise" on the token embedding -> the vocab-parallel embedding (always used).
Any other entry (packed or gathered projections, experts, MLA, local parameters, ...) is a
ValueError naming it: never a guessed split. A model without a plan is a ValueError pointing to
docs/policies.md (deriving a split by tracing a block is not built). Fused kernels are left off
(`fused_*` unset, `fused_final_norm` False).

The rest comes from the model's structure: the embedding (`get_input_embeddings()`), the
decoder-layer list and final norm (`base_model_pp_plan`, else the ModuleList of
`config.num_hidden_layers` and the base model's one norm child), the LM head
(`get_output_embeddings()`), the attention module (the parent of the column-parallel linears
that has a `head_dim`), which of its linears carry query and which key/value heads (their
output sizes against `config.num_attention_heads / num_key_value_heads * head_dim`), and which
int attributes of the attention count heads (named for heads or groups, valued as the config).

Then one decoder block is run (`block_check.py`): unsharded, and as tp simulated ranks in
threads (`simulated_tp.py`) with this policy's split, forward and backward. That derives
`tp_input_copies` (modules whose output feeds only column-parallel linears) and replicated
parameters whose gradient is a per-rank partial sum (`tp_partial`), and checks that every rank's output, input gradient and
every parameter's gradient equal the unsharded block's; a difference, or an op that fails, is a
ValueError naming the block and pointing to docs/policies.md. `policy.to_source()` prints the
result as policy source.
"""
from __future__ import annotations

import re

from torch import nn

from .base import Policy, _REGISTRY

DOCS = "docs/policies.md"
COLUMN, ROW, PARTIAL = "colwise", "rowwise", "replicated_with_grad_allreduce"
HEAD_ATTR = re.compile(r"^num_(?!.*(dim|size))\w*(head|group)s?$")


def inference_error(what: str) -> ValueError:
    """A ValueError from infer_policy, pointing to the policy guide."""
    return ValueError(f"sf.infer_policy: {what}; write a policy for it instead (a shardformer.policies.Policy "
                      f"subclass with @register_policy, or shard_model(model, policy=...); see {DOCS})")


def _path_of(root: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in root.named_modules() if m is module), None) if module is not None else None


def _structure(model: nn.Module) -> dict:
    """embedding, layers, lm_head and final_norm paths from the model's structure."""
    config, base = model.config, model.base_model
    embedding = _path_of(base, model.get_input_embeddings())
    if not embedding or not isinstance(base.get_submodule(embedding), nn.Embedding):
        raise inference_error(f"{type(model).__name__}.get_input_embeddings() is no nn.Embedding inside model.base_model")
    pp_plan = dict(getattr(config, "base_model_pp_plan", None) or {})
    lists = [name for name in pp_plan if isinstance(getattr(base, name, None), nn.ModuleList)]
    if not lists:
        layers_count = getattr(config, "num_hidden_layers", None)
        lists = [name for name, m in base.named_children()
                 if isinstance(m, nn.ModuleList) and len(m) == layers_count]
    if len(lists) != 1:
        raise inference_error(f"cannot tell the decoder-layer list of {type(base).__name__} (candidates: {lists}; "
                    f"model.config.num_hidden_layers={getattr(config, 'num_hidden_layers', None)})")
    layers = lists[0]
    after = list(pp_plan)[list(pp_plan).index(layers) + 1:] if layers in pp_plan else []
    norms = [n for n in after if "norm" in n] or [n for n, _ in base.named_children() if "norm" in n.lower()]
    head = _path_of(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    return dict(embedding=embedding, layers=layers, lm_head=head or "lm_head",
                final_norm=norms[0] if len(norms) == 1 else None)


def _translate_tp_plan(model: nn.Module, embedding: str, layers: str) -> dict[str, list[str]]:
    """{"column": [...], "row": [...], "partial": [...]} from `config.base_model_tp_plan`."""
    plan = dict(getattr(model.config, "base_model_tp_plan", None) or {})
    prefix = f"{layers}.*."
    if not any(key.startswith(prefix) for key in plan):
        raise inference_error(f"model.config.base_model_tp_plan has no entry for the decoder layers ({type(model).__name__}, "
                    f"model_type={model.config.model_type!r}; plan: {plan or None}) and deriving a split by tracing "
                    f"a block is not built, so model.base_model.{layers}.0 could not be split")
    found = {"column": [], "row": [], "partial": []}
    layer_list = model.base_model.get_submodule(layers)
    for key, style in plan.items():
        if key == embedding and style == "embedding_rowwise":
            continue  # the token embedding is always vocab-parallel
        entry = key[len(prefix):] if key.startswith(prefix) else None
        kind = {COLUMN: "column", ROW: "row", PARTIAL: "partial"}.get(style)
        if kind is None or entry is None or "*" in entry:
            raise inference_error(f"model.config.base_model_tp_plan[{key!r}]={style!r} has no faithful translation "
                        f"(translated: {COLUMN!r}, {ROW!r} and {PARTIAL!r} inside {layers}.*, and "
                        f"'embedding_rowwise' on the token embedding)")
        modules = [layer.get_submodule(entry) for layer in layer_list if _has(layer, entry)]
        if not modules:
            continue  # the plan covers a variant of the architecture this model does not use
        if kind != "partial" and not all(type(m) is nn.Linear for m in modules):
            bad = next(type(m).__name__ for m in modules if type(m) is not nn.Linear)
            raise inference_error(f"model.config.base_model_tp_plan[{key!r}]={style!r} names a {bad}, not an nn.Linear")
        found[kind].append(entry)
    return found


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _attention(model: nn.Module, layer: nn.Module, column: list[str]) -> dict:
    """attention path, query / kv projections and the attention's per-rank head attributes."""
    config = model.config
    parents = sorted({c.rpartition(".")[0] for c in column if "." in c})
    found = [p for p in parents if hasattr(layer.get_submodule(p), "head_dim")]
    if len(found) != 1:
        raise inference_error(f"cannot tell the attention module among {parents} of model.base_model layers "
                    f"(expected one parent of the column-parallel linears with a head_dim)")
    path, attention = found[0], layer.get_submodule(found[0])
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise inference_error(f"model.config.num_attention_heads is {heads!r}")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = attention.head_dim
    query, kv = [], []
    for entry in (c for c in column if c.startswith(path + ".")):
        out, name = layer.get_submodule(entry).out_features, entry.rpartition(".")[2]
        if out == kv_heads * head_dim and (kv_heads != heads or re.search(r"(^|_)(k|v|key|value)(_|$)", name)):
            kv.append(entry)
        elif out == heads * head_dim:
            query.append(entry)
        else:
            raise inference_error(f"model.base_model layers' {entry} has {out} outputs: neither num_attention_heads={heads} "
                        f"nor num_key_value_heads={kv_heads} times {type(attention).__name__}.head_dim={head_dim}")
    if not query:
        raise inference_error(f"no query projection found among the column-parallel linears of {path}")
    local = {}
    for attr, value in vars(attention).items():
        if type(value) is not int or not HEAD_ATTR.match(attr):
            continue
        what = "groups" if "group" in attr else "kv_heads" if re.search(r"kv|key_value", attr) else "q_heads"
        want = {"groups": heads // kv_heads, "kv_heads": kv_heads, "q_heads": heads}[what]
        if value != want:
            raise inference_error(f"{type(attention).__name__}.{attr}={value} looks like a head count ({what}) but the "
                        f"config says {want}")
        local[attr] = what
    return dict(attention=path, query_projections=tuple(query), kv_projections=tuple(kv),
                attention_local_attrs=local)


def _embedding_scale(embedding: nn.Embedding) -> str | None:
    """For an embedding with its own forward: the attribute holding the number its lookup is
    multiplied by, found by trying each number-valued attribute named like a scale (None for a
    plain nn.Embedding); a ValueError when its forward is not lookup x scale."""
    import torch

    if type(embedding).forward is nn.Embedding.forward:
        return None
    ids = torch.arange(min(16, embedding.num_embeddings), device=embedding.weight.device).unsqueeze(0)
    with torch.no_grad():
        got, lookup = embedding(ids).float(), embedding.weight[ids].float()
    names = [n for n in list(vars(embedding)) + [n for n, _ in embedding.named_buffers(recurse=False)] if "scale" in n]
    for name in names:
        value = getattr(embedding, name)
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (got - lookup * value).abs().max() <= 1e-6 * max(got.abs().max().item(), 1e-30):
                return name
    raise inference_error(f"the token embedding {type(embedding).__name__} has its own forward, which is no lookup times one "
                f"of its number attributes {names}: the vocab-parallel embedding would lose what it does")


def _class_name(model_type: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^0-9a-zA-Z]+", model_type) if part) + "Policy"


def infer_policy(model: nn.Module, tp_size: int = 2) -> Policy:
    """A Policy for `model` derived from its config's tensor-parallel plan and its structure,
    checked on its first decoder block against the unsharded block at `tp_size` simulated ranks
    (see the module docstring). Raises ValueError (naming the entry, block or op, and pointing
    to docs/policies.md) when no faithful policy can be derived. Print `policy.to_source()` to
    save and edit it."""
    from .block_check import check_block, probe_model  # they run the block: torch and engine imports

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "base_model"):
        raise inference_error(f"{type(model).__name__} is no transformers model (no config / base_model)")
    fields = _structure(model)
    split = _translate_tp_plan(model, fields["embedding"], fields["layers"])
    layer = model.base_model.get_submodule(fields["layers"])[0]
    fields |= _attention(model, layer, split["column"])
    probe = probe_model(model)  # the model itself, unless it is on the meta device
    fields["embedding_scale"] = _embedding_scale(probe.base_model.get_submodule(fields["embedding"]))
    policy = Policy(name=_class_name(config.model_type), model_types=(config.model_type,),
                    column_parallel=tuple(split["column"]), row_parallel=tuple(split["row"]),
                    tp_partial=tuple(split["partial"]), fused_final_norm=False, **fields)
    return check_block(probe, policy, tp_size)


def describe(policy: Policy, tp: int) -> str:
    """One line naming what `infer_policy` derived."""
    parts = [f"column {', '.join(policy.column_parallel)}", f"row {', '.join(policy.row_parallel)}"]
    if policy.tp_partial:
        parts.append(f"partial {', '.join(policy.tp_partial)}")
    return (f"{policy.name} ({'; '.join(parts)}) from config.base_model_tp_plan and a run of one decoder "
            f"block, checked against the unsharded block at tp={tp}")


def registered_or_inferred(model: nn.Module, tp_size: int) -> tuple[Policy, str | None]:
    """The registered policy for `model`, else one from `infer_policy` with a one-line notice."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type], None
    try:
        policy = infer_policy(model, tp_size)
    except ValueError as err:
        raise ValueError(f"no shardformer policy registered for model.config.model_type={model_type!r} "
                         f"({type(model).__name__}; registered: {', '.join(sorted(_REGISTRY))}), and {err}") from err
    from .block_check import check_tp

    tp = check_tp(model.config, policy, tp_size)
    return policy, (f"shardformer: no policy registered for model_type {model_type!r}; derived "
                    f"{describe(policy, tp)} (print sf.infer_policy(model).to_source() to save and edit it)")
