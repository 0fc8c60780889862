"""Following a tensor-parallel split through an aten graph of one block (`trace.py`).

Each value's state is the dimension split over tp ranks, or None for a value whole on every
rank (a tuple-valued op has a list). `propagate` walks the graph once in order:
  matmul with a parameter (mm / addmm / _grouped_mm, the parameter seen through t / transpose /
      select): whole input -> column-parallel (output split along its features) when its output
      reaches another such matmul's input, else replicated; input split along the contracted
      features -> row-parallel (output whole);
  views and reshapes: the split dimension is mapped through the shapes (features -> heads);
  transposes, permutes, unsqueeze, squeeze, copies: the dimension is moved;
  elementwise ops: split operands must agree and whole operands must broadcast along it;
  reductions, softmax, norms, sort / topk, cumsum: must not run over it;
  matmuls of two activations and attention kernels: over split heads / batch dims only;
  split / chunk / slices of a column output along its features: packed parts, each split alone;
  a reduction over the split features inside a module call that `regions` names as an RMSNorm
      (`Policy.split_norms`): allowed when that call reads exactly one split tensor, the uncut
      output of a column-parallel matmul split along its features, besides the norm's own 1-D
      `weight` of that output's full width, and hands exactly one tensor of the same shape out;
      its output is then split as its input (and still that matmul's output), its interior ops
      are not followed one by one (the engine's SplitRMSNorm all-reduces the sum of squares).
Anything else that sees a split value raises SplitError naming the node.
"""
from __future__ import annotations

import math
import operator
from collections import deque

import torch
from torch.fx import Node

aten = torch.ops.aten


class SplitError(Exception):
    def __init__(self, node: Node, why: str):
        super().__init__(why)
        self.node = node


def _val(node):
    return node.meta.get("val") if isinstance(node, Node) else None


def _shape(node) -> tuple[int, ...] | None:
    value = _val(node)
    return tuple(value.shape) if torch.is_tensor(value) else None


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _is_float(node) -> bool:
    value = _val(node)
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(torch.is_tensor(v) and v.is_floating_point() for v in values)


_SAME = {aten.alias.default, aten.detach.default, aten.clone.default, aten._to_copy.default,
         aten.lift_fresh_copy.default, aten.empty_like.default, aten.zeros_like.default,
         aten.ones_like.default, aten.full_like.default, aten.contiguous.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_SOFTMAX = {aten._softmax.default, aten._safe_softmax.default, aten._log_softmax.default,
            aten.cumsum.default, aten.sort.default}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.argmax.default,
           aten.argmin.default, aten.var.correction, aten.var_mean.correction, aten.linalg_vector_norm.default}
_NORMS = {aten.native_layer_norm.default, getattr(aten, "_fused_rms_norm", aten.native_layer_norm).default}
_ATTENTION = {getattr(aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention") if hasattr(aten, name)}


def _weight(node: Node, names: dict, params: dict) -> tuple[str, int] | None:
    """(parameter name, its output dimension) when `node`, the right operand [..., k, n] of a
    matmul, is a parameter seen through transposes, selects and shape-keeping copies."""
    shape = _shape(node)
    if shape is None:
        return None
    out, cur = len(shape) - 1, node
    while cur.op == "call_function":
        target, src = cur.target, cur.args[0]
        if not isinstance(src, Node):
            return None
        ndim = len(_shape(src) or ())
        if target is aten.t.default:
            out = 1 - out
        elif target is aten.transpose.int:
            d0, d1 = (_dim(d, ndim) for d in cur.args[1:3])
            out = d1 if out == d0 else d0 if out == d1 else out
        elif target is aten.permute.default:
            out = _dim(cur.args[1][out], ndim)
        elif target is aten.select.int:
            out += out >= _dim(cur.args[1], ndim)
        elif not (target in _SAME or (target in _VIEWS | {aten.expand.default} and _shape(src) == _shape(cur))):
            return None
        cur = src
    name = names.get(cur)
    return (name, out) if name in params else None


def _matmul(node: Node):
    """(data operand, right operand) of a matmul node, else None."""
    if node.op != "call_function":
        return None
    if node.target in (aten.mm.default, aten.bmm.default, aten._grouped_mm.default):
        return node.args[0], node.args[1]
    if node.target is aten.addmm.default:
        return node.args[1], node.args[2]
    return None


def _inputs(node: Node) -> list[Node]:
    flat = []
    for a in list(node.args) + list(node.kwargs.values()):
        for x in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(x, Node) and torch.is_tensor(_val(x)):
                flat.append(x)
    return flat


def _map_view(src: tuple, dst: tuple, s: int, tp: int):
    """The dimension of `dst` holding the split of `src`'s dimension `s` (rank blocks stay whole
    blocks: same outer boundary, a size dividing by tp), and the size per index of that dim."""
    outer = math.prod(src[s:])
    for e in range(len(dst)):
        if math.prod(dst[e:]) == outer and dst[e] % tp == 0:
            return e, math.prod(dst[e + 1:])
    return None, None


class _Pass:
    def __init__(self, graph, names, params, tp, regions=None):
        self.graph, self.names, self.params, self.tp, self.regions = graph, names, params, tp, regions
        self.state, self.origin, self.found, self.parts, self.roles = {}, {}, {}, {}, {}
        self.linears, self.norms, self.done = {}, {}, set()  # norms: module path -> (column parameter, node)
        for node in graph.nodes:
            mm = _matmul(node)
            weight = _weight(mm[1], names, params) if mm else None
            if weight:
                self.linears[node] = (mm[0], weight)

    def feeds_linear(self, start: Node) -> bool:
        """Whether `start`'s value reaches, through floating-point ops, the data input of a
        matmul with a parameter."""
        seen, queue = {start}, deque([start])
        while queue:
            node = queue.popleft()
            for user in node.users:
                if user in self.linears:
                    if self.linears[user][0] is node:
                        return True
                    continue
                if user not in seen and _is_float(user):
                    seen.add(user)
                    queue.append(user)
        return False

    def fail(self, node, why):
        raise SplitError(node, why)

    def run(self) -> tuple[dict, dict]:
        for node in self.graph.nodes:
            if node in self.done:  # inside a split norm's call (`split_norm`), already given its state
                continue
            try:
                self.state[node] = self.step(node)
            except SplitError:
                raise
            except Exception as err:  # noqa: BLE001 - an op a rule misreads: named, never a crash
                raise SplitError(node, f"its rule could not follow the split ({type(err).__name__}: {err})") from err
        for param, spans in self.parts.items():
            spans = sorted(spans)
            size = self.params[param].shape[self.found[param][3]]
            ends = [0] + [end for _, end in spans]
            if [start for start, _ in spans] != ends[:-1] or ends[-1] != size:
                self.fail(self.found[param][4], f"the parts cut from {param}'s output {spans} do not tile its "
                          f"{size} features")
            self.found[param][1] = tuple(end - start for start, end in spans)
        for path, (param, node) in self.norms.items():
            if param in self.parts:
                self.fail(node, f"normalises the output of {param}, which is cut into packed parts (a norm over "
                          "packed parts is not supported)")
        found = {p: (kind, parts, head) for p, (kind, parts, head, _, _) in self.found.items()}
        return found, {path: param for path, (param, _) in self.norms.items()}

    def step(self, node: Node):
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for x in _inputs(node):
                if self.state.get(x) is not None:
                    self.fail(x, f"the block's output is split along dim {self.state[x]}: a column-parallel output "
                              "reaches it without a row-parallel linear")
            return None
        if node.target is operator.getitem:
            s = self.state[node.args[0]]
            self.origin[node] = self.origin.get((node.args[0], node.args[1]))
            return s[node.args[1]] if isinstance(s, list) else s
        if node in self.linears:
            return self.linear(node)
        ins = _inputs(node)
        if all(self.state.get(x) is None for x in ins):
            return None
        return self.split_op(node, ins)

    def linear(self, node):
        data, (param, out_dim) = self.linears[node]
        s, ndim = self.state[data], len(_shape(data))
        if s is None:
            features = self.params[param].shape[out_dim]
            if features % self.tp or not self.feeds_linear(node):
                return self.role(node, param, "replicated", out_dim)  # a router, a one-output gate
            self.role(node, param, "column", out_dim)
            self.origin[node] = (param, None)
            return len(_shape(node)) - 1
        if s != ndim - 1:
            self.fail(node, f"the matmul with {param} reads its input split along dim {s}, not its features")
        return self.role(node, param, "row", out_dim)

    def role(self, node, param, kind, out_dim):
        """Record `param`'s role; a second use in another role is a SplitError."""
        before = self.roles.setdefault(param, kind)
        if before != kind:
            self.fail(node, f"{param} is used as a {before} matmul's weight and here as a {kind} one's")
        if kind != "replicated":
            self.found.setdefault(param, [kind, None, None, out_dim, node])
        return None

    def split_op(self, node, ins):
        t, x = node.target, node.args[0]
        s = self.state.get(x) if isinstance(x, Node) else None
        out_nd = len(_shape(node) or ())
        keep = self.origin.get(x)
        if t in _SAME or t is aten.expand.default:
            self.origin[node] = keep
            return s + out_nd - len(_shape(x)) if s is not None else self.broadcast(node, ins)
        if t in _VIEWS:
            e, inner = _map_view(_shape(x), _shape(node), s, self.tp)
            if e is None:
                self.fail(node, f"the view {_shape(x)} -> {_shape(node)} breaks the split of dim {s} into "
                          f"tp={self.tp} blocks")
            if keep and e == out_nd - 1 and _shape(node)[e] == _shape(x)[s]:
                self.origin[node] = keep
            elif keep and e < out_nd - 1:
                self.found[keep[0]][2] = self.found[keep[0]][2] or inner  # (heads, head size)
            return e
        if t is aten.t.default:
            return 1 - s
        if t is aten.transpose.int:
            d0, d1 = (_dim(d, len(_shape(x))) for d in node.args[1:3])
            return d1 if s == d0 else d0 if s == d1 else s
        if t is aten.permute.default:
            return [_dim(d, out_nd) for d in node.args[1]].index(s)
        if t is aten.unsqueeze.default:
            return self.keep_origin(node, x, s + (_dim(node.args[1], out_nd) <= s))
        if t in (aten.squeeze.dim, aten.squeeze.dims):
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            gone = sum(_dim(d, len(_shape(x))) < s for d in dims if _shape(x)[_dim(d, len(_shape(x)))] == 1)
            return self.keep_origin(node, x, s - gone)
        if t is aten.select.int:
            dim = _dim(node.args[1], len(_shape(x)))
            if dim == s:
                self.fail(node, f"picks one index of dim {s}, which is split over tp")
            return s - (dim < s)
        if t is aten.unbind.int:
            dim = _dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(x)))
            if dim == s:
                self.fail(node, f"unbinds dim {s}, which is split over tp")
            return [s - (dim < s)] * len(_val(node))
        if t is aten.slice.Tensor or t in (aten.split.Tensor, aten.split_with_sizes.default):
            return self.cut(node, x, s)
        if t is aten.stack.default:
            states = {self.state.get(a) for a in node.args[0]}
            dim = _dim(node.args[1] if len(node.args) > 1 else 0, out_nd)
            if len(states) != 1 or None in states:
                self.fail(node, f"stacks tensors split along dims {sorted(states, key=str)}")
            s = states.pop()
            return s + (dim <= s)
        if t is aten.cat.default:
            states = {self.state.get(a) for a in node.args[0]}
            dim = _dim(node.args[1] if len(node.args) > 1 else 0, out_nd)
            if len(states) != 1 or dim in states:
                self.fail(node, f"concatenates tensors split along dims {sorted(states, key=str)} along dim {dim}")
            return states.pop()
        if torch.Tag.pointwise in getattr(t, "tags", ()) or t in (aten.where.self, aten.masked_fill.Scalar,
                                                                  aten.masked_fill.Tensor):
            return self.broadcast(node, ins)
        if t in _SOFTMAX | _REDUCE | _NORMS or t is aten.topk.default:
            return self.reduce(node, x, s)
        if t in (aten.bmm.default, aten.mm.default):
            return self.matmul(node)
        if t in _ATTENTION:
            return self.attention(node, ins)
        if t in (aten.index_add.default, aten.index_add_.default):
            if s != self.state.get(node.args[3]) or s == _dim(node.args[1], out_nd):
                self.fail(node, "adds values split differently from the target (or along the indexed dim)")
            return s
        if t is aten.index.Tensor:
            return self.index(node, s)
        self.fail(node, f"no rule says how {t} treats a tensor split along dim {s} (state of the inputs: "
                  f"{[self.state.get(i) for i in ins]})")

    def keep_origin(self, node, x, s):
        """`s`, noting that `node` still holds the column output `x` came from (a last dim unchanged)."""
        if self.origin.get(x) and s == len(_shape(node)) - 1:
            self.origin[node] = self.origin[x]
        return s

    def index(self, node, s):
        """Advanced indexing with integer index tensors at consecutive dims, none of them `s`."""
        indices = node.args[1]
        at = [d for d, i in enumerate(indices) if i is not None]
        if any(self.state.get(i) is not None or not torch.is_tensor(_val(i)) or _val(i).is_floating_point()
               or _val(i).dtype == torch.bool for i in indices if i is not None) or at != list(range(at[0], at[-1] + 1)):
            self.fail(node, "indexes with split, boolean or non-consecutive index tensors")
        if at[0] <= s <= at[-1]:
            self.fail(node, f"indexes the dim {s} that is split over tp")
        width = len(_shape(node)) - (len(_shape(node.args[0])) - len(at))  # dims the index tensors give
        return s if s < at[0] else s - len(at) + width  # the index dims take the indexed block's place

    def broadcast(self, node, ins):
        out_nd, found = len(_shape(node) or ()), set()
        for x in ins:
            s = self.state.get(x)
            if isinstance(s, int):
                found.add(s + out_nd - len(_shape(x)))
        if len(found) != 1:
            self.fail(node, f"combines tensors split along different dims {sorted(found)}")
        d = found.pop()
        for x in ins:
            shape = _shape(x)
            k = d - (out_nd - len(shape))
            if self.state.get(x) is None and k >= 0 and shape[k] != 1:
                self.fail(node, f"combines a tensor split along dim {d} with one whole on every rank that has "
                          f"{shape[k]} entries there (a split value meets the residual stream, or a per-feature "
                          f"tensor no policy entry splits)")
        split = [x for x in ins if self.state.get(x) is not None]
        if len(split) == 1 and _shape(split[0]) == _shape(node):  # the same features, elementwise
            self.keep_origin(node, split[0], d)
        return d

    def reduce(self, node, x, s):
        t, nd = node.target, len(_shape(x))
        if t in _NORMS:
            dims = list(range(nd - len(node.args[1]), nd))
        elif t is aten.topk.default:
            dims = [_dim(node.args[2] if len(node.args) > 2 else -1, nd)]
        elif t in _SOFTMAX:
            dims = [_dim(node.args[1] if len(node.args) > 1 else -1, nd)]
        else:  # no dim, or an empty list of dims: every dim (linalg_vector_norm's dim comes after ord)
            position = 2 if t is aten.linalg_vector_norm.default else 1
            arg = node.args[position] if len(node.args) > position else node.kwargs.get("dim")
            arg = [arg] if isinstance(arg, int) else list(arg or [])
            dims = [_dim(d, nd) for d in arg] or list(range(nd))
        if s in dims:
            return self.split_norm(node, s, f"runs over dim {s}, which is split over tp (it needs every rank's "
                                   "features")
        value = _val(node)
        outs = value if isinstance(value, (list, tuple)) else [value]
        mapped = [s if torch.is_tensor(v) and v.dim() == nd else s - sum(d < s for d in dims)
                  if torch.is_tensor(v) else None for v in outs]
        return mapped if isinstance(value, (list, tuple)) else mapped[0]

    def split_norm(self, node, s, why):
        """`node` reduces over the split features: allowed inside an RMSNorm's call over a column
        output (see the module docstring), whose ops then all get their state here (None inside,
        the input's at its output); else a SplitError saying `why` (and why the module is not such
        a norm, when `regions` names one)."""
        region = self.regions(node) if self.regions else None
        if region is None:
            self.fail(node, why + ")")
        path, nodes, problem = region
        inside = set(nodes)
        outer = list(dict.fromkeys(x for n in nodes for x in _inputs(n) if x not in inside))
        split = [x for x in outer if self.state.get(x) is not None]
        whole = [self.names.get(x) for x in outer if self.state.get(x) is None]
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        x = split[0] if len(split) == 1 else None
        keep = self.origin.get(x) if x is not None else None
        weight = self.params.get(f"{path}.weight")
        if problem is None:
            if x is None:
                problem = f"it reads {len(split)} tensors split over tp, not one"
            elif self.state[x] != len(_shape(x)) - 1 or s != self.state[x]:
                problem = f"its input is split along dim {self.state[x]}, not along the features it normalises"
            elif not keep or keep[1] is not None or self.found.get(keep[0], ["row"])[0] != "column":
                problem = "its input is not the (uncut) output of a column-parallel linear"
            elif whole != [f"{path}.weight"] or weight is None or tuple(weight.shape) != (_shape(x)[-1],):
                problem = (f"it reads {whole} besides its input, not only its own weight of the input's "
                           f"{_shape(x)[-1]} features")
            elif len(outs) != 1 or _shape(outs[0]) != _shape(x):
                problem = "it does not hand out one tensor shaped as its input"
            elif self.norms.setdefault(path, (keep[0], node))[0] != keep[0]:
                problem = f"it normalises the outputs of both {self.norms[path][0]} and {keep[0]}"
        if problem is not None:
            self.fail(node, f"{why}; not a norm the split supports: {problem})")
        for n in nodes:
            self.state[n] = None
            self.done.add(n)
        self.state[outs[0]], self.origin[outs[0]] = s, keep
        return None

    def matmul(self, node):
        a, b = node.args[0], node.args[1]
        sa, sb, nd = self.state.get(a), self.state.get(b), len(_shape(node))
        if sa == nd - 1 or sb == nd - 2:
            self.fail(node, "multiplies along a dim split over tp (a partial sum no policy entry reduces)")
        if sa is not None and sb is not None and sa == sb and sa < nd - 2:
            return sa
        if sa == nd - 2 and sb is None:
            return sa
        if sb == nd - 1 and sa is None:
            return sb
        self.fail(node, f"multiplies tensors split along dims {sa} and {sb}")

    def attention(self, node, ins):
        q, k, v = node.args[:3]
        heads = {self.state.get(q), self.state.get(k), self.state.get(v)}
        if heads != {1}:
            self.fail(node, f"attends over q / k / v split along dims {sorted(heads, key=str)}, not their heads")
        for other in ins:
            if other in (q, k, v) or self.state.get(other) == 1:
                continue
            if self.state.get(other) is not None or (_shape(other)[1:2] or (1,))[0] != 1:
                self.fail(node, f"attends with a mask / bias split along dim {self.state.get(other)} or whole over "
                          f"{_shape(other)[1]} heads")
        value = _val(node)
        outs = value if isinstance(value, (list, tuple)) else [value]
        mapped = [1 if torch.is_tensor(o) and o.dim() >= 3 else None for o in outs]
        return mapped if isinstance(value, (list, tuple)) else mapped[0]

    def cut(self, node, x, s):
        t, nd = node.target, len(_shape(x))
        dim = _dim(node.args[1] if t is aten.slice.Tensor else node.args[2] if len(node.args) > 2 else 0, nd)
        count = len(_val(node)) if t is not aten.slice.Tensor else 1
        if dim != s:
            return s if t is aten.slice.Tensor else [s] * count
        keep = self.origin.get(x)
        if not keep or keep[1] is not None:
            self.fail(node, f"cuts dim {s}, which is split over tp (only a column-parallel output may be cut into "
                      "packed parts, once)")
        param, size = keep[0], _shape(x)[s]
        spans = self.parts.setdefault(param, [])
        if t is aten.slice.Tensor:
            start, end = node.args[2] if len(node.args) > 2 else 0, node.args[3] if len(node.args) > 3 else size
            spans.append((start, min(end, size)))
            self.origin[node] = (param, len(spans) - 1)
            return s
        sizes = node.args[1] if t is aten.split_with_sizes.default else [node.args[1]] * count
        start = 0
        for i, width in enumerate(sizes):
            spans.append((start, min(start + width, size)))
            self.origin[(node, i)] = (param, len(spans) - 1)
            start += width
        return [s] * count


def propagate(graph, names: dict, params: dict, tp: int, regions=None) -> tuple[dict, dict]:
    """({parameter: (kind, part widths or None, head size or None)} for every matmul with a
    parameter that is column- or row-parallel, {norm module path: the column parameter whose
    output it normalises}), following the split through `graph`. `regions(node)`: None, or
    (module path, the nodes of the innermost module call that made `node`, None when that module
    is an RMSNorm else why not) for a module that may be a split norm."""
    return _Pass(graph, names, params, tp, regions).run()
