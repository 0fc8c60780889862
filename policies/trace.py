"""Deriving a tensor-parallel split by tracing one decoder block (`infer_policy`, when the
model's config has no usable `base_model_tp_plan`).

The block is traced with `torch.fx` (`make_fx`: real inputs, aten ops, the parameters as graph
inputs), then one pass over the graph follows which dimension of each value is split over tp
(`split_rules.py`):
  * a matmul against a parameter (`nn.Linear`, transformers' `Conv1D`, a slice of a 3-D experts
    parameter) whose input is whole on every rank is column-parallel when its output reaches the
    input of another such matmul (q/k/v, gate/up; a router whose scores only weigh outputs stays
    replicated); its output is split along its features;
  * a matmul whose input is split along the contracted features is row-parallel; its output is
    whole again (after the all-reduce);
  * a column output cut along its features (`split`, `chunk`, slices) packs parts (Phi-3's
    qkv, GPT-2's c_attn, gate_up): each part is split on its own; the view after a projection
    that turns its features into (heads, head size) gives the head size;
  * a reduction over the split features inside the call of an RMSNorm module (one that
    `shardformer.tensor_parallel.norm.rms_norm_form` accepts: weight * x / sqrt(mean(x^2) + eps),
    checked by running it) whose input is the uncut output of a column-parallel linear and whose
    1-D weight has that output's full width (OLMo 2's `q_norm` / `k_norm` over all heads) makes
    it a `split_norms` entry {norm: that linear}; its output is split as its input, and its
    interior ops are not followed one by one (the engine all-reduces each row's sum of squares);
  * every other op must keep the split dimension intact (elementwise ops, views, transposes,
    attention over split heads, reductions over other dimensions); the block's output must be
    whole. An op that would need the whole features (a norm over all heads of another formula,
    or over something else than one column output, a split tensor added to a whole one) is a
    ValueError naming the block, the op and its source line (and, inside a norm-like module,
    why it is no split RMSNorm).
The result is then checked numerically on the block like any derived policy (`block_check.py`).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import re

import torch
from torch import nn

from .split_rules import SplitError, propagate


@dataclasses.dataclass
class TracedSplit:
    column: list[str]                 # module paths in the block (nn.Linear / Conv1D)
    row: list[str]
    experts: dict[str, dict[str, str]]  # experts module -> {3-D parameter: "column" | "row"}
    packed: dict[str, tuple[int, ...]]  # column entry -> widths of its parts
    head_dims: dict[str, int]         # column entry -> head size read from its heads view
    split_norms: dict[str, str]       # RMSNorm module path -> the column entry whose output it normalises
    trace: "BlockTrace" = None


@dataclasses.dataclass
class BlockTrace:
    graph: torch.fx.GraphModule
    names: dict           # placeholder node -> parameter name
    owner: dict           # node -> innermost module path that made it
    reads: dict           # module path -> attributes read on it in forward
    config_reads: dict    # module path -> config attributes read while it was innermost
    calls: list = dataclasses.field(default_factory=list)  # (start, end node index, module path) per call


def _recording(obj, log: set) -> None:
    """Make `obj` (a copy) log the names of attributes read on it into `log`."""
    cls = type(obj)

    def __getattribute__(self, name, _get=cls.__getattribute__):
        log.add(name)
        return _get(self, name)

    obj.__class__ = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})


def _hooks(block: nn.Module, trace: BlockTrace):
    """Hooks recording, per submodule call, the graph nodes it made, and the attributes read
    on each module and on its config while it is the innermost module running."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    spans, stack, handles, config_log = [], [], [], set()

    def count():
        mode = get_proxy_mode()
        return len(mode.tracer.graph.nodes) if mode is not None else 0

    def flush():
        if stack:
            trace.config_reads.setdefault(stack[-1][0], set()).update(config_log)
        config_log.clear()

    def pre(path):
        flush()
        stack.append((path, count()))

    def post(path):
        flush()
        spans.append((stack.pop()[1], count(), path))

    configs = {id(m.config): m.config for m in block.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    for config in configs.values():
        _recording(config, config_log)
    for path, module in block.named_modules():
        if path:
            _recording(module, trace.reads.setdefault(path, set()))
            handles.append(module.register_forward_pre_hook(lambda m, a, p=path: pre(p)))
            handles.append(module.register_forward_hook(lambda m, a, o, p=path: post(p)))
    return spans, handles


def trace_block(layer: nn.Module, call) -> BlockTrace:
    """`layer`'s forward on `call` = (args, kwargs), traced with make_fx in eval mode on a copy,
    its hidden states the traced input and its parameters graph inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call

    block = copy.deepcopy(layer).eval()
    args, kwargs = call
    x = args[0] if args else kwargs["hidden_states"]
    rest, kwargs = (args[1:], kwargs) if args else ((), {k: v for k, v in kwargs.items() if k != "hidden_states"})
    params = dict(block.named_parameters())

    def run(p, hidden):
        out = functional_call(block, p, (hidden,) + tuple(rest), kwargs)
        return out if torch.is_tensor(out) else next(o for o in out if torch.is_tensor(o))

    stack_traces = {"record_stack_traces": True} if "record_stack_traces" in inspect.signature(make_fx).parameters else {}
    trace = BlockTrace(None, {}, {}, {}, {})
    spans, handles = _hooks(block, trace)
    try:
        with torch.no_grad():
            trace.graph = make_fx(run, **stack_traces)(params, x.detach())
    finally:
        for h in handles:
            h.remove()
    nodes = list(trace.graph.graph.nodes)
    trace.calls = spans
    placeholders = [n for n in nodes if n.op == "placeholder"]
    trace.names = dict(zip(placeholders, list(params)))  # the dict's leaves come first, in order
    # the innermost module wins: shorter spans, and on a tie (a wrapper of one module) the deeper path, last
    for start, end, path in sorted(spans, key=lambda s: (s[1] - s[0], -s[2].count(".")), reverse=True):
        for node in nodes[start:end]:
            trace.owner[node] = path
    return trace


def _source(node) -> str:
    """`file:line: code` of the innermost model line (outside torch) that made `node`."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.meta.get("stack_trace") or "")
    ours = [(f, n, code) for f, n, code in frames if "/torch/" not in f]
    if not ours:
        return "no source line"
    file, line, code = ours[-1]
    return f"{file.rpartition('/')[2]}:{line}: {code.strip()}"


def derive_split(layer: nn.Module, call, tp: int, where: str) -> TracedSplit:
    """The split of `layer` (see the module docstring) for `tp` ranks; DeriveFailure naming
    the module in `where`, the op and its source line when the graph has an op the split cannot
    pass."""
    from shardformer.tensor_parallel.linear import weight_layout

    from .infer import DeriveFailure

    try:
        trace = trace_block(layer, call)
    except Exception as err:  # noqa: BLE001 - reported with the op that raised
        from .block_check import _where

        raise DeriveFailure(f"torch.fx could not trace it: {_where(err)}") from err
    modules = dict(layer.named_modules())
    try:
        found, norms = propagate(trace.graph.graph, trace.names, dict(layer.named_parameters()), tp,
                                 _norm_regions(trace, modules, where))
    except SplitError as err:
        module = trace.owner.get(err.node)
        inside = f" in {where}.{module} ({type(modules[module]).__name__})" if module else f" in {where}"
        raise DeriveFailure(f"it stopped at op {err.node.target}{inside}, {_source(err.node)}: {err}") from None
    column, row, experts, packed, head_dims = [], [], {}, {}, {}
    for param, (kind, parts, head_dim) in found.items():
        path, _, leaf = param.rpartition(".")
        if layer.get_parameter(param).dim() == 3:
            experts.setdefault(path, {})[leaf] = kind
            entry = param
        elif weight_layout(modules[path]) is None or leaf != "weight":
            raise DeriveFailure(f"{where}.{param} ({type(modules[path]).__name__}) is multiplied like a linear "
                                "layer's weight, but its module is no nn.Linear / Conv1D that could be split")
        else:
            (column if kind == "column" else row).append(path)
            entry = path
        if parts and len(parts) > 1:
            packed[entry] = parts
        if head_dim:
            head_dims[entry] = head_dim
    if not (column or experts) or not (row or experts):
        raise DeriveFailure(f"it found no {'column' if not column else 'row'}-parallel linear in {where}")
    split_norms = {path: param.rpartition(".")[0] for path, param in norms.items()}
    return TracedSplit(column, row, experts, packed, head_dims, split_norms, trace)


def _norm_regions(trace: BlockTrace, modules: dict, where: str):
    """`regions` for `propagate`: for a node made inside a norm-like module (its class named
    "...Norm" / "...NormX...", or with a 1-D `weight`), (its path, the nodes of its innermost
    call holding the node, None when `rms_norm_form` accepts the module else its reason); None
    for any other node."""
    from shardformer.tensor_parallel.norm import rms_norm_form

    nodes = list(trace.graph.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}

    def regions(node):
        path = trace.owner.get(node)
        module = modules.get(path) if path else None
        weight = getattr(module, "weight", None)
        if module is None or not (re.search(r"Norm(?![a-z])", type(module).__name__)
                                  or (isinstance(weight, nn.Parameter) and weight.dim() == 1)):
            return None
        i = index[node]
        start, end, _ = min((c for c in trace.calls if c[2] == path and c[0] <= i < c[1]), key=lambda c: c[1] - c[0])
        try:
            rms_norm_form(module, f"{where.removeprefix('model.')}.{path}")
            problem = None
        except ValueError as err:
            problem = str(err)
        return path, nodes[start:end], problem

    return regions


def merge_splits(splits: list[TracedSplit]) -> TracedSplit:
    """One split from those of several kinds of block (entries of either; a module column-
    parallel in one kind and row-parallel in another is a DeriveFailure)."""
    from .infer import DeriveFailure

    if len(splits) == 1:
        return splits[0]
    column = list(dict.fromkeys(e for s in splits for e in s.column))
    row = list(dict.fromkeys(e for s in splits for e in s.row))
    both = set(column) & set(row)
    if both:
        raise DeriveFailure(f"{sorted(both)[0]} is column-parallel in one kind of decoder layer and row-parallel in another")
    merged = TracedSplit(column, row, {}, {}, {}, {}, BlockTrace(None, {}, {}, {}, {}))
    for s in splits:
        for name, mine, theirs in (("experts", merged.experts, s.experts), ("packed", merged.packed, s.packed),
                                   ("head_dims", merged.head_dims, s.head_dims),
                                   ("split_norms", merged.split_norms, s.split_norms)):
            for key, value in theirs.items():
                if mine.setdefault(key, value) != value:
                    raise DeriveFailure(f"{key} differs between kinds of decoder layer ({name}: {mine[key]} and {value})")
        for mine, theirs in ((merged.trace.reads, s.trace.reads), (merged.trace.config_reads, s.trace.config_reads)):
            for path, names in theirs.items():
                mine.setdefault(path, set()).update(names)
    return merged
