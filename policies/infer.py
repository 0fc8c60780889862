"""`infer_policy(model)`: a Policy derived for a model that has none, checked before use.

Where the split comes from, in this order:
  1. the model config's `base_model_tp_plan` (transformers' own tensor-parallel hints), when
     every entry has a faithful translation:
        "colwise" -> column_parallel, "rowwise" -> row_parallel,
        "replicated_with_grad_allreduce" -> tp_partial (whole on every rank, gradients summed),
        "embedding_rowwise" on the token embedding -> the vocab-parallel embedding (always used);
  2. otherwise (no plan, entries such as packed / gathered projections or experts, or a plan
     whose split fails the block check below), a
     `torch.fx` trace of the first decoder block (`trace.py`, `split_rules.py`): matmuls with a
     parameter reading the block's whole input and feeding another such matmul are column-
     parallel, those reading split features are row-parallel, a column output cut along its
     features packs parts (`packed`, sized by the config attributes matching each part), a
     3-D experts parameter becomes an `experts` entry, an RMSNorm over a whole column output
     (OLMo 2's `q_norm` over all heads' queries) a `split_norms` entry, and the view after a
     projection gives the head size. An op the split cannot pass (a norm over all heads of
     another formula, a split value meeting the residual stream) is a ValueError naming the
     block, the op and its source line. With
     decoder layers of several kinds (`block_check.layer_kinds`: a dense first layer, experts
     after it), one block of each kind is traced, the splits merged, and an entry missing from
     some layers is `optional`.
Fused kernels are left off (`fused_*` unset, `fused_final_norm` False).

The rest comes from the model's structure and a run of it: the embedding
(`get_input_embeddings()`), whether the base model reshapes its final hidden states to the whole
sequence (`whole_sequence_output`: GPT-2; the sp-axis modes are then refused), learned
positions (another embedding of the base model with `config.max_position_embeddings` rows), the
decoder-layer list and final norm (`base_model_pp_plan`, else the ModuleList of
`config.num_hidden_layers` and the base model's one norm child), the LM head
(`get_output_embeddings()`), the attention module (the parent of the column-parallel linears
that has a head size), which of its linears carry query and which key/value heads (their
output sizes against `config.num_attention_heads / num_key_value_heads * head_dim`), which
int attributes of the attention count heads (named for heads or groups, valued as the config)
or, read in its forward, hold the query width, and (traced) which head counts it reads from its
config in forward (`attention_local_config`).

Then one decoder block of each kind is run (`block_check.py`): unsharded, and as tp simulated ranks in
threads (`simulated_tp.py`) with this policy's split, forward and backward. That derives
`tp_input_copies` (modules whose output feeds only column-parallel linears) and replicated
parameters whose gradient is a per-rank partial sum (`tp_partial`), and checks that every rank's output, input gradient and
every parameter's gradient equal the unsharded block's; a difference, or an op that fails, is a
ValueError naming the block and pointing to docs/policies.md. `policy.to_source()` prints the
result as policy source.
"""
from __future__ import annotations

import math
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


class DeriveFailure(Exception):
    """Why one way of deriving the split (the tp plan, the trace) gave none."""


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
    norms = [n for n in after if "norm" in n] or [n for n, m in base.named_children()
                                                  if "norm" in n.lower() or "Norm" in type(m).__name__]
    head = _path_of(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    positions = [n for n, m in base.named_children() if isinstance(m, nn.Embedding) and n != embedding
                 and m.num_embeddings == getattr(config, "max_position_embeddings", None)]
    return dict(embedding=embedding, layers=layers, lm_head=head or "lm_head",
                final_norm=norms[0] if len(norms) == 1 else None,
                position_embedding=positions[0] if len(positions) == 1 else None)


def _translate_tp_plan(model: nn.Module, embedding: str, layers: str) -> dict[str, list[str]]:
    """{"column": [...], "row": [...], "partial": [...]} from `config.base_model_tp_plan`."""
    plan = dict(getattr(model.config, "base_model_tp_plan", None) or {})
    prefix = f"{layers}.*."
    if not any(key.startswith(prefix) for key in plan):
        raise DeriveFailure(f"model.config.base_model_tp_plan has no entry for the decoder layers ({type(model).__name__}, "
                    f"model_type={model.config.model_type!r}; plan: {plan or None})")
    found = {"column": [], "row": [], "partial": []}
    layer_list = model.base_model.get_submodule(layers)
    for key, style in plan.items():
        if key == embedding and style == "embedding_rowwise":
            continue  # the token embedding is always vocab-parallel
        entry = key[len(prefix):] if key.startswith(prefix) else None
        kind = {COLUMN: "column", ROW: "row", PARTIAL: "partial"}.get(style)
        if kind is None or entry is None or "*" in entry:
            raise DeriveFailure(f"model.config.base_model_tp_plan[{key!r}]={style!r} has no faithful translation "
                        f"(translated: {COLUMN!r}, {ROW!r} and {PARTIAL!r} inside {layers}.*, and "
                        f"'embedding_rowwise' on the token embedding)")
        modules = [layer.get_submodule(entry) for layer in layer_list if _has(layer, entry)]
        if not modules:
            continue  # the plan covers a variant of the architecture this model does not use
        if kind != "partial" and not all(type(m) is nn.Linear for m in modules):
            bad = next(type(m).__name__ for m in modules if type(m) is not nn.Linear)
            raise DeriveFailure(f"model.config.base_model_tp_plan[{key!r}]={style!r} names a {bad}, not an nn.Linear")
        found[kind].append(entry)
    if not found["column"] or not found["row"]:
        raise DeriveFailure(f"model.config.base_model_tp_plan splits no {'column' if not found['column'] else 'row'}-"
                            f"parallel linear of this model's decoder layers (plan: {plan})")
    return found


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _attention(model: nn.Module, layer: nn.Module, column: list[str], traced=None) -> dict:
    """attention path, query / kv projections and the attention's per-rank head attributes
    (`traced`: a TracedSplit, whose head sizes, packed parts and attribute reads are used)."""
    from shardformer.tensor_parallel.linear import weight_layout

    config = model.config
    head_dims = traced.head_dims if traced else {}
    packed = traced.packed if traced else {}

    def head_dim_of(parent):
        seen = {d for entry, d in head_dims.items() if entry.startswith(parent + ".")}
        return seen.pop() if len(seen) == 1 else getattr(layer.get_submodule(parent), "head_dim", None)

    column = [c for c in column if _has(layer, c)]  # the attention is in every layer; other entries may not be
    parents = sorted({c.rpartition(".")[0] for c in column if "." in c})
    found = [p for p in parents if isinstance(head_dim_of(p), int)]
    if len(found) != 1:
        raise DeriveFailure(f"cannot tell the attention module among {parents} of model.base_model layers "
                    f"(expected one parent of the column-parallel linears with a head size)")
    path, attention = found[0], layer.get_submodule(found[0])
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise DeriveFailure(f"model.config.num_attention_heads is {heads!r}")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = head_dim_of(path)
    query, kv = [], []
    for entry in (c for c in column if c.startswith(path + ".") and c not in packed):
        out, name = weight_layout(layer.get_submodule(entry))[1], entry.rpartition(".")[2]
        if out == kv_heads * head_dim and (kv_heads != heads or re.fullmatch(r"w?(k|v|key|value)(_proj)?", name.lower())):
            kv.append(entry)
        elif out == heads * head_dim:
            query.append(entry)
        else:
            raise DeriveFailure(f"model.base_model layers' {entry} has {out} outputs: neither num_attention_heads={heads} "
                        f"nor num_key_value_heads={kv_heads} times the head size {head_dim}")
    if not query and not any(p.startswith(path + ".") for p in packed):
        raise DeriveFailure(f"no query projection found among the column-parallel linears of {path}")
    local = {}
    reads = traced.trace.reads.get(path, set()) if traced else set()
    for attr, value in vars(attention).items():
        if type(value) is not int:
            continue
        if HEAD_ATTR.match(attr):
            what = "groups" if "group" in attr else "kv_heads" if re.search(r"kv|key_value", attr) else "q_heads"
            want = {"groups": heads // kv_heads, "kv_heads": kv_heads, "q_heads": heads}[what]
            if value != want:
                raise DeriveFailure(f"{type(attention).__name__}.{attr}={value} looks like a head count ({what}) but "
                            f"the config says {want}")
            local[attr] = what
        elif attr in reads and value == heads * head_dim and not re.search(r"head_(dim|size)", attr):
            local[attr] = "q_width"  # read in forward (GPT-2 splits its fused output at `split_size`)
    config_reads = traced.trace.config_reads.get(path, set()) if traced else set()
    local_config = {attr: what for attr, what in (("num_attention_heads", "q_heads"),
                                                  ("num_key_value_heads", "kv_heads")) if attr in config_reads}
    return dict(attention=path, query_projections=tuple(query), kv_projections=tuple(kv),
                attention_local_attrs=local, attention_local_config=local_config)


def _packed_attrs(config, entry: str, widths: tuple[int, ...], head_dim: int | None) -> tuple[str, ...]:
    """The config attributes sizing each part of a packed projection: head counts for parts of
    whole heads (`head_dim` given: inside the attention), else the attribute valued as the part
    (`intermediate_size` first)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = []
    for width in widths:
        if head_dim and width == heads * head_dim:
            names.append("num_attention_heads")
        elif head_dim and width == kv_heads * head_dim:
            names.append("num_key_value_heads")
        else:
            same = sorted((attr for attr, value in config.to_dict().items() if type(value) is int and value == width),
                          key=lambda attr: ("intermediate" not in attr, attr))
            if not same:
                raise inference_error(f"the traced projection {entry} packs parts of widths {widths}, but no "
                                      f"model.config attribute is {width}")
            names.append(same[0])
    values = [getattr(config, name) for name in names]
    if any(width * values[0] != widths[0] * value for width, value in zip(widths, values)):
        raise inference_error(f"the traced projection {entry} packs parts of widths {widths}, not in proportion to "
                              f"model.config's {dict(zip(names, values))}")
    return tuple(names)


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
    """A Policy for `model` derived from its config's tensor-parallel plan, else from a trace of
    one decoder block, and its structure; checked on its first decoder block against the
    unsharded block at `tp_size` simulated ranks (see the module docstring). Raises ValueError
    (naming the entry, block or op, and pointing to docs/policies.md) when no faithful policy
    can be derived. Print `policy.to_source()` to save and edit it."""
    return _infer(model, tp_size)[0]


def _infer(model: nn.Module, tp_size: int) -> tuple[Policy, str]:
    """(the policy, where its split came from)."""
    from .block_check import _block_inputs, check_block, layer_kinds, probe_model, reshapes_to_whole_sequence
    from .trace import derive_split, merge_splits

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "base_model"):
        raise inference_error(f"{type(model).__name__} is no transformers model (no config / base_model)")
    fields = _structure(model)
    layer_list = model.base_model.get_submodule(fields["layers"])
    kinds = layer_kinds(layer_list)
    probe = probe_model(model, max(kinds) + 1)  # the model itself, unless it is on the meta device
    fields["embedding_scale"] = _embedding_scale(probe.base_model.get_submodule(fields["embedding"]))
    fields["whole_sequence_output"] = reshapes_to_whole_sequence(probe, fields["final_norm"])
    try:
        split = _translate_tp_plan(model, fields["embedding"], fields["layers"])
        attention = _attention(model, layer_list[0], split["column"])
    except DeriveFailure as no_plan:
        why = str(no_plan)
    else:
        policy = _policy(config, layer_list, split, fields | attention)
        try:
            return check_block(probe, policy, tp_size, kinds), "config.base_model_tp_plan"
        except ValueError as failed:  # a plan that splits this model wrongly: the trace may do better
            why = f"the split of model.config.base_model_tp_plan failed its check ({_reason(failed)})"
    base = _path_of(probe, probe.base_model)
    probe_layers = probe.base_model.get_submodule(fields["layers"])
    traced = []
    for index in kinds:
        where = f"model.{base + '.' if base else ''}{fields['layers']}.{index}"
        block = probe_layers[index]
        try:
            traced.append(derive_split(block, _block_inputs(probe, block), _trace_tp(config), where))
        except DeriveFailure as no_trace:
            raise inference_error(f"{why}; a torch.fx trace of {where} ({type(block).__name__}) found no split "
                                  f"either: {no_trace}") from None
    traced = merge_splits(traced)
    split = {"column": traced.column, "row": traced.row, "partial": []}
    try:
        attention = _attention(model, layer_list[0], split["column"], traced)
    except DeriveFailure as no_attention:
        raise inference_error(f"{why}; after a torch.fx trace of {where}: {no_attention}") from None
    fields |= attention | {"experts": traced.experts, "split_norms": traced.split_norms, "packed": {
        e: _packed_attrs(config, e, w, traced.head_dims.get(e)) for e, w in traced.packed.items()}}
    source = "a torch.fx trace of one decoder block"
    if len(kinds) > 1:
        source = f"a torch.fx trace of one decoder block of each kind (layers {', '.join(map(str, kinds))})"
    return check_block(probe, _policy(config, layer_list, split, fields), tp_size, kinds), source


def _policy(config, layer_list, split: dict, fields: dict) -> Policy:
    """The derived Policy: `split`'s entries (those missing from some layers `optional`) and `fields`."""
    entries = list(split["column"]) + list(split["row"]) + list(split["partial"]) + list(fields.get("experts", {}))
    entries += list(fields.get("split_norms", {}))
    optional = tuple(e for e in entries if not all(_has(each, e) for each in layer_list))
    return Policy(name=_class_name(config.model_type), model_types=(config.model_type,),
                  column_parallel=tuple(split["column"]), row_parallel=tuple(split["row"]),
                  tp_partial=tuple(split["partial"]), fused_final_norm=False, optional=optional, **fields)


def _reason(err: ValueError) -> str:
    """An infer_policy error's own words (without its prefix and its pointer to the guide)."""
    return str(err).removeprefix("sf.infer_policy: ").split("; write a policy for it instead")[0]


def _trace_tp(config) -> int:
    """The rank count the trace follows the split for: the smallest above 1 that divides both
    the query and the KV head counts (the split's structure does not depend on it; KV heads are
    replicated when the real tp exceeds them, which the block check then runs), else 2."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv, int):
        return 2
    return next((d for d in range(2, math.gcd(heads, kv) + 1) if heads % d == 0 and kv % d == 0), 2)


def describe(policy: Policy, tp: int, source: str) -> str:
    """One line naming what `infer_policy` derived."""
    parts = [f"column {', '.join(policy.column_parallel)}", f"row {', '.join(policy.row_parallel)}"]
    for entry, params in policy.experts.items():
        parts.append(f"experts {entry} ({', '.join(f'{k} {v}' for k, v in params.items())})")
    if policy.packed:
        parts.append(f"packed {', '.join(policy.packed)}")
    if policy.split_norms:
        parts.append(f"split norms {', '.join(f'{n} ({c})' for n, c in policy.split_norms.items())}")
    if policy.tp_partial:
        parts.append(f"partial {', '.join(policy.tp_partial)}")
    return (f"{policy.name} ({'; '.join(parts)}) from {source} and a run of one decoder "
            f"block, checked against the unsharded block at tp={tp}")


def registered_or_inferred(model: nn.Module, tp_size: int) -> tuple[Policy, str | None]:
    """The registered policy for `model`, else one from `infer_policy` with a one-line notice."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type], None
    try:
        policy, source = _infer(model, tp_size)
    except ValueError as err:
        raise ValueError(f"no shardformer policy registered for model.config.model_type={model_type!r} "
                         f"({type(model).__name__}; registered: {', '.join(sorted(_REGISTRY))}), and {err}") from err
    from .block_check import check_tp

    tp = check_tp(model.config, policy, tp_size)
    return policy, (f"shardformer: no policy registered for model_type {model_type!r}; derived "
                    f"{describe(policy, tp, source)} (print sf.infer_policy(model).to_source() to save and edit it)")
