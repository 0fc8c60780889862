"""Check a derived policy on one decoder block against the unsharded block (`infer_policy`).

The model's first decoder block is run on the inputs the model itself gives it (its embedding,
mask and positions for 8 tokens, captured by a pre-hook that stops the model there):
  * unsharded, forward and backward of a fixed random projection of its output, recording
    which modules' outputs are read only as the input of column-parallel linears (those become
    `tp_input_copies`: the output is handed to the tp group once, not once per linear);
  * as `tp` simulated ranks, one thread each, with the policy's split exactly as the engine
    plans it (`plan_tensor_parallel` specs, `split_tensor` pieces, per-rank head attributes):
    column linears with the identity forward / all-reduce backward on their input, row linears
    all-reducing their partial products in forward (`nn.Linear` or `Conv1D`), stacked experts
    cut per expert with their inputs handed to the group and their output all-reduced,
    `split_norms` as RMSNorms over split features (weight cut as their linear's outputs, each
    row's sum of squares all-reduced in forward and backward, divided by the KV replicas), the
    all-reduces done between the threads.
Every rank's output and input gradient must equal the unsharded block's, and every parameter's
gradient, merged as the engine merges it (split pieces concatenated, KV replicas and
`tp_partial` copies summed; a split norm's weight as its linear's), too (relative error
<= 1e-4, a gradient measured against at least 1e-3 of the block's largest gradient entry, so
that one zero up to rounding is no failure; a wrong split is off by order one).
A whole parameter whose per-rank gradients only sum to the unsharded one sees only this rank's
features (Apertus' activation parameters): its module becomes `tp_partial`.
No collective and no change to the model: the ranks are copies of the block sharing its
weights (fp32 CPU copies when the model is elsewhere or in another dtype). A model on the meta
device is probed on a fresh one-layer model built from its config.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import traceback

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from shardformer.tensor_parallel.linear import _bias_spec, weight_layout

from .infer import inference_error as _fail
from .simulated_tp import CopyToGroup, RankLinear, RankRMSNorm, SimulatedGroup, rank_experts

TOL = 1e-4
SEQ = 8
# Reading these from a tensor does not consume its values.
_METADATA = {"size", "dim", "shape", "dtype", "device", "ndim", "is_contiguous", "__get__", "numel",
             "is_floating_point", "requires_grad", "layout", "__len__", "data_ptr", "stride", "storage_offset"}


class _Stop(Exception):
    pass


def _first_tensor(out):
    return out if torch.is_tensor(out) else next(o for o in out if torch.is_tensor(o))


def probe_model(model: nn.Module, layers: int = 1) -> nn.Module:
    """`model`, or for a meta-device model a fresh fp32 model of its class and config with its
    first `layers` decoder layers and a vocabulary of at most 256 (memory: those layers)."""
    if not any(p.is_meta for p in model.parameters()):
        return model
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    for key, value in vars(config).items():  # per-layer lists (layer_types, ...) follow the layer count
        if isinstance(value, list) and len(value) == total:
            setattr(config, key, value[:layers])
    config.num_hidden_layers = layers
    config.vocab_size = min(config.vocab_size, 256)  # the embedding and head play no part in the check
    if (getattr(config, "pad_token_id", None) or 0) >= config.vocab_size:
        config.pad_token_id = None
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(0)
        return type(model)(config).float()


@contextlib.contextmanager
def _quietly(model: nn.Module):
    """The model in eval mode (no dropout: no random number drawn), each module's mode and the
    CPU random state restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def layer_kinds(layers) -> list[int]:
    """The index of the first decoder layer of each kind (class and parameter shapes), e.g. [0, 1]
    for a model whose first layer has a dense MLP and the others experts."""
    first = {}
    for index, layer in enumerate(layers):
        kind = (type(layer).__name__, tuple((name, tuple(p.shape)) for name, p in layer.named_parameters()))
        first.setdefault(kind, index)
    return sorted(first.values())


def _run_base(model: nn.Module):
    """The base model's output for SEQ fixed token ids, without gradients, quietly (eval mode)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(SEQ, device=next(model.parameters()).device) * 7 + 1).remainder(vocab).unsqueeze(0)
    with torch.no_grad(), _quietly(model):
        return model.base_model(input_ids=ids, use_cache=False)


def _block_inputs(model: nn.Module, layer: nn.Module):
    """(args, kwargs) the model passes its decoder layer `layer` for SEQ tokens."""
    captured = {}

    def stop(module, args, kwargs):
        captured["call"] = (args, kwargs)
        raise _Stop

    handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        _run_base(model)
    except _Stop:
        pass
    except Exception as err:  # noqa: BLE001 - reported with the op that raised
        raise _fail(f"{type(model.base_model).__name__} did not run up to its decoder layer: {_where(err)}")
    finally:
        handle.remove()
    if "call" not in captured:
        raise _fail(f"{type(model.base_model).__name__} did not call its decoder layer {type(layer).__name__}")
    return captured["call"]


def reshapes_to_whole_sequence(model: nn.Module, final_norm: str | None) -> bool:
    """Whether the base model reshapes its final norm's output to the input's sequence length
    (GPT-2's `view(output_shape)`; `Policy.whole_sequence_output`): the norm is made to return
    the first half of the sequence, and the base model then fails or returns more than that."""
    if final_norm is None:
        return False
    handle = model.base_model.get_submodule(final_norm).register_forward_hook(lambda m, a, out: out[:, :SEQ // 2])
    try:
        return _run_base(model)[0].shape[1] != SEQ // 2  # last_hidden_state (a ModelOutput or a tuple)
    except torch.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001 - a reshape to the whole length fails on half of it
        return True
    finally:
        handle.remove()


def _to_probe(value):
    """Tensors moved to fp32 CPU (recursively through tuples, lists and dicts)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_probe(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_probe(v) for k, v in value.items()}
    return value


def _copy_sharing(layer: nn.Module) -> nn.Module:
    """A copy of `layer` (its own modules and attributes) sharing its parameters and buffers."""
    memo = {id(t): t for t in list(layer.parameters()) + list(layer.buffers())}
    return copy.deepcopy(layer, memo).eval()


class _Consumers(TorchFunctionMode):
    """Records, for each watched tensor (a module's output), what reads its values: the path
    of a linear reading it as input (`F.linear`, or `Conv1D`'s addmm on a view of it), or the
    op's name; views of a watched tensor are watched in its place."""

    def __init__(self, linears: dict[int, str]):
        super().__init__()
        self.linears, self.watched, self.uses, self.keep = linears, {}, {}, []

    def watch(self, path: str, output):
        if torch.is_tensor(output):
            self.watched[id(output)] = path
            self.keep.append(output)
            self.uses.setdefault(path, set())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        out = func(*args, **kwargs)
        if name in _METADATA:
            return out
        flat = list(args) + list(kwargs.values())
        for i, a in enumerate(flat):
            path = self.watched.get(id(a)) if torch.is_tensor(a) else None
            if path is None:
                continue
            if name in ("view", "reshape") and i == 0:
                self.watch(path, out)
                continue
            weight = flat[1] if func is F.linear and i == 0 else flat[2] if func is torch.addmm and i == 1 else None
            linear = self.linears.get(id(weight)) if weight is not None else None
            self.uses[path].add(linear or f"op {name}")
        return out


def _run(block, call, probe, watch=None):
    """Forward + backward of (output * probe).sum(); (output, {name: grad}) with "<input>"."""
    args, kwargs = call
    x = (args[0] if args else kwargs["hidden_states"]).detach().clone().requires_grad_()
    args, kwargs = ((x,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=x))
    out = _first_tensor(block(*args, **kwargs))
    names, params = zip(*[(n, p) for n, p in block.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad((out * probe).sum(), (x,) + params, allow_unused=True)
    return out.detach(), {"<input>": grads[0]} | {n: g for n, g in zip(names, grads[1:])}


def _derive_copies(layer, call, probe, column: set[str]):
    """The unsharded block's run, and {module: column linears} for modules whose output is
    read only as the input of column-parallel linears."""
    block = _copy_sharing(layer)
    linears = {id(m.weight): name for name, m in block.named_modules() if weight_layout(m) is not None}
    mode = _Consumers(linears)
    handles = [m.register_forward_hook(lambda mod, a, out, path=name: mode.watch(path, out))
               for name, m in block.named_modules() if name and weight_layout(m) is None]
    try:
        with mode:
            ref = _run(block, call, probe)
    finally:
        for h in handles:
            h.remove()
    copies = {path: tuple(sorted(uses, key=list(linears.values()).index)) for path, uses in mode.uses.items()
              if uses and uses <= column}
    return ref, copies


def _rel(a, b, floor: float = 0.0) -> float:
    """max |a - b| relative to max |b|, or to `floor` when larger (a gradient that is zero up to
    rounding, e.g. a key bias's under softmax, is compared at the scale of the block's gradients)."""
    a = torch.zeros_like(b) if a is None else a
    denom = max(b.abs().max().item(), floor)
    diff = (a - b).abs().max().item()
    return diff if denom == 0 else diff / denom


def check_tp(config, policy, tp_size: int) -> int:
    """`tp_size`, or for 1 the smallest split the head counts allow (1 when none does)."""
    if tp_size > 1:
        return tp_size
    heads = getattr(config, policy.num_heads_attr)
    kv = getattr(config, policy.num_kv_heads_attr, None) or heads
    return next((d for d in range(2, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0)), 1)


@torch.enable_grad()  # callers may run under no_grad (sf.init_model)
def check_block(model: nn.Module, policy, tp_size: int, layers: tuple[int, ...] = (0,)):
    """`policy` with `tp_input_copies` and derived `tp_partial` entries, checked on the decoder
    blocks `layers` (one of each kind the model has) at `check_tp(tp_size)` simulated ranks.
    ValueError otherwise. A module's output is handed to the tp group once (`tp_input_copies`)
    only where every checked block holding it reads it in column-parallel linears alone."""
    from shardformer.tensor_parallel.plan import plan_tensor_parallel

    model = probe_model(model, max(layers) + 1)
    tp = check_tp(model.config, policy, tp_size)
    plan = plan_tensor_parallel(model, policy, tp)
    checked, partial = [], set()
    for index in layers:
        layer_copies, layer_partial, layer_owners = _check_layer(model, policy, plan, tp, index)
        checked.append((layer_copies, layer_owners))
        partial |= layer_partial
    copies = {}
    for owner in dict.fromkeys(o for layer_copies, _ in checked for o in layer_copies):
        if all(owner in layer_copies for layer_copies, owners in checked if owner in owners):
            copies[owner] = tuple(dict.fromkeys(t for layer_copies, _ in checked for t in layer_copies.get(owner, ())))
    new = tuple(sorted(partial - set(policy.tp_partial)))
    return dataclasses.replace(policy, tp_input_copies=copies, tp_partial=tuple(policy.tp_partial) + new)


def _check_layer(model, policy, plan, tp: int, index: int):
    """Block `index` checked (see module docstring): ({module: column linears} whose output they
    alone read, {modules found to hold per-rank partial gradients}, {this block's module paths})."""
    from shardformer.sharding import merge_pieces
    from shardformer.tensor_parallel.local_config import LocalConfig

    prefix = f"{plan.layers_path}.{index}."
    where = f"model.{plan.layers_path}.{index}"
    layer = model.get_submodule(plan.layers_path)[index]
    owners = {name for name, _ in layer.named_modules() if name}
    call = _block_inputs(model, layer)
    param = next(layer.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        layer, call = copy.deepcopy(layer).to("cpu", torch.float32), _to_probe(call)
    specs = {p[len(prefix):]: (plan.kinds[p], s) for p, s in plan.specs.items() if p.startswith(prefix)}
    experts = {p[len(prefix):]: e for p, e in plan.experts.items() if p.startswith(prefix)}
    split_params = {f"{path}.weight": spec for path, (_, spec) in specs.items()}
    split_params |= {f"{path}.bias": _bias_spec(spec) for path, (kind, spec) in specs.items() if kind == "column"}
    split_params |= {f"{path}.{name}": spec for path, params in experts.items() for name, spec in params.items()}
    norms = {p[len(prefix):]: n for p, n in plan.split_norms.items() if p.startswith(prefix)}
    split_params |= {f"{path}.weight": spec for path, (spec, _) in norms.items()}
    column = {p for p, (kind, _) in specs.items() if kind == "column"}
    hidden = (call[0][0] if call[0] else call[1]["hidden_states"])
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    try:
        ref, copies = _derive_copies(layer, call, probe, column)
    except Exception as err:  # noqa: BLE001 - reported with the op that raised
        raise _fail(f"{where} ({type(layer).__name__}) did not run unsharded: {_where(err)}") from err
    attrs = plan.attention_attrs.get(prefix + policy.attention, {})
    local_config = plan.attention_config.get(prefix + policy.attention)
    group, results, errors = SimulatedGroup(tp), [None] * tp, [None] * tp

    def rank_main(rank):
        try:
            block = _copy_sharing(layer)
            copied = {t for targets in copies.values() for t in targets}
            for path, (kind, spec) in specs.items():
                linear = RankLinear(layer.get_submodule(path), kind, spec, group, rank, path not in copied)
                policy.replace(block, path, linear)
            for path, params in experts.items():
                rank_experts(block.get_submodule(path), params, group, rank)
            for path, (spec, form) in norms.items():
                policy.replace(block, path, RankRMSNorm(layer.get_submodule(path), spec, form, group, rank))
            for owner in copies:
                block.get_submodule(owner).register_forward_hook(lambda m, a, out: CopyToGroup.apply(out, group, rank))
            for attr, value in attrs.items():
                setattr(block.get_submodule(policy.attention), attr, value)
            if local_config:
                block.get_submodule(policy.attention).config = LocalConfig(model, local_config)
            results[rank] = _run(block, call, probe)
        except BaseException as err:  # noqa: BLE001 - reported below, naming the op
            errors[rank] = err
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        raise _fail(f"{where} ({type(layer).__name__}) failed with the derived {policy.name} at tp={tp}: "
                    f"{_where(first)}") from first
    partial = _compare(policy, ref, results, split_params, merge_pieces, where, tp)
    return copies, partial, owners


def _where(err: BaseException) -> str:
    """The error and the op (innermost frame of the model's code) that raised it."""
    import os

    import shardformer

    ours = (os.path.dirname(__file__), os.path.dirname(shardformer.__file__))
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    model_frames = [f for f in frames if not f.filename.startswith(ours) and "/torch/" not in f.filename]
    frame = (model_frames or frames or [None])[-1]
    op = f" in {frame.name} ({frame.filename.rpartition('/')[2]}:{frame.lineno}: {frame.line})" if frame else ""
    return f"{type(err).__name__}{op}: {err}"


def _compare(policy, ref, results, split_params, merge_pieces, where, tp):
    """Every rank against the unsharded block (see module docstring); the modules found to hold
    per-rank partial gradients (not yet in `policy.tp_partial`)."""
    ref_out, ref_grads = ref
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values() if g is not None)
    errs, partial = {}, set(policy.tp_partial)
    for rank, (out, _) in enumerate(results):
        errs[f"rank {rank}'s output"] = _rel(out, ref_out)
    derived = {}
    for name, want in ref_grads.items():
        if want is None:
            continue
        got = [grads[name] for _, grads in results]
        owner, _, leaf = name.rpartition(".")
        spec = split_params.get(name)
        if spec is not None:
            zero = [torch.zeros_like(g) if g is None else g for g in got]
            pieces = [sum(zero[r - r % spec.replicas: r - r % spec.replicas + spec.replicas]) if spec.partial
                      else zero[r] for r in range(tp)]
            errs[f"{name}'s gradient"] = _rel(merge_pieces(pieces, spec), want, floor)
        elif owner in partial:
            errs[f"{name}'s gradient (summed over tp)"] = _rel(sum(g for g in got if g is not None), want, floor)
        else:
            each = max(_rel(g, want, floor) for g in got)
            if each > TOL and name != "<input>" and _rel(sum(g for g in got if g is not None), want, floor) <= TOL:
                derived.setdefault(owner, set()).add(leaf)
            else:
                errs[f"{name}'s gradient" if name != "<input>" else "the input's gradient"] = each
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    if bad:
        what, err = next(iter(bad.items()))
        raise _fail(f"the derived {policy.name} does not reproduce {where} at tp={tp}: {what} differs from the "
                    f"unsharded block's by {err:.2e} relative ({len(bad)} such differences)")
    layer_params = dict(results[0][1])
    for owner, leaves in derived.items():
        own = {n.rpartition(".")[2] for n in layer_params if n.rpartition(".")[0] == owner}
        if not owner or leaves != own:
            raise _fail(f"parameters {sorted(leaves)} of {where}.{owner or '<layer>'} see only each rank's features "
                        f"(their gradients are per-rank partial sums), but not all of that module's own parameters do")
    return set(derived)
