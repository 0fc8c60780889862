"""Tensor parallelism for HF's stacked mixture-of-experts modules (`Policy.experts`): Mixtral's
`mlp.experts` holds every expert's weights as 3-D tensors ([experts, 2 I, H] gate/up packed,
[experts, H, I] down) and dispatches its forward through `config._experts_implementation`
(eager, batched_mm, grouped_mm, ...). The module is not substituted: its parameters are cut in
place and HF's forward, whichever implementation it picks, runs on the local pieces (they only
read the weights' shapes and `chunk(2)` the gate/up output).

Each expert's intermediate dimension I is split over tp:
  gate_up_proj ("column", packed gate | up): rank r holds rows [r I/tp, (r+1) I/tp) of each part
  down_proj ("row"): rank r holds the same columns of I
    forward: the module's floating-point inputs (hidden states [T, H], routing weights [T, k])
             enter as identity; its output [T, H] is all-reduced (sum) over tp (each rank's
             experts give a partial sum over their share of I, weighted by the routing weights)
    backward: the gradients of those inputs are all-reduced (sum) over tp (each rank's is a
              partial sum), so the replicated router upstream sees the full gradient on every
              rank; the output's gradient passes unchanged.
The router, its aux loss and the routing itself are replicated: every rank routes every token
identically (router jitter noise must be 0 in training, else ranks would draw different noise).
"""
from __future__ import annotations

import torch
from torch import nn

from ..comm import copy_to_group, reduce_from_group
from ..sharding import ShardSpec, record_specs, split_parameter


def plan_experts(module: nn.Module, entry: str, path: str, policy, config, tp: int) -> dict[str, ShardSpec]:
    """{parameter name: spec} for one experts module at `path` (policy entry `entry`); ValueError
    naming the model attribute for what the split cannot reproduce."""
    for attr, ok, why in (("has_bias", False, "its biases would be added once per rank"),
                          ("is_concatenated", True, "gate and up rows are interleaved, not packed one after the other")):
        if getattr(module, attr, ok) != ok:
            raise policy.entry_error("experts", entry, f"matches model.{path} with {attr}={not ok}: not supported "
                                     f"under tensor parallelism ({why}); use ShardConfig.tp_size=1")
    jitter = getattr(config, "router_jitter_noise", 0) or 0
    if tp > 1 and jitter:
        raise ValueError(f"ShardConfig.tp_size={tp} with model.config.router_jitter_noise={jitter}: each tp rank would "
                         f"draw its own noise for model.{path.rpartition('.')[0]}'s routing; set it to 0 to shard")
    transposed = bool(getattr(module, "is_transposed", False))
    specs = {}
    for name, kind in policy.experts[entry].items():
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or param.dim() != 3:
            raise policy.entry_error("experts", {entry: dict(policy.experts[entry])},
                                     f"names model.{path}.{name}, which is no 3-D parameter")
        if kind not in ("column", "row"):
            raise policy.entry_error("experts", {entry: dict(policy.experts[entry])}, f"has kind {kind!r} for {name}, "
                                     "expected 'column' or 'row'")
        dim = 1 + ((kind == "column") == transposed)  # [E, out, in]: column splits out (1), row splits in (2)
        size = param.shape[dim]
        key = f"{entry}.{name}"
        if key in policy.packed:
            from .plan import _packed_spec

            specs[name] = _packed_spec(config, policy, tp, key, f"{path}.{name}", size, dim)
            continue
        if size % tp:
            raise ValueError(f"ShardConfig.tp_size={tp} does not divide model.{path}.{name}.shape[{dim}]={size} "
                             "(each expert's intermediate size)")
        specs[name] = ShardSpec(dim, size, tp)
    return specs


def _copy_inputs(group):
    """Forward pre-hook: hand every floating-point input to the tp group (gradient all-reduced)."""

    def hook(module, args, kwargs):
        def copy(x):
            return copy_to_group(x, group) if torch.is_tensor(x) and x.is_floating_point() else x

        return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}

    return hook


def _reduce_output(group):
    def hook(module, args, output):
        return reduce_from_group(output, group)

    return hook


def apply_experts(module: nn.Module, specs: dict[str, ShardSpec], group, tp_rank: int) -> None:
    """Cut `module`'s planned parameters to this rank's pieces and install the hooks (see the
    module docstring). No collective."""
    for name, spec in specs.items():
        setattr(module, name, split_parameter(getattr(module, name), spec, tp_rank))
    record_specs(module, **specs)
    module.register_forward_pre_hook(_copy_inputs(group), with_kwargs=True)
    module.register_forward_hook(_reduce_output(group))


def check_family_layout(model: nn.Module, policy, config) -> None:
    """ValueError for a layout the family does not support (`Policy.refused`, and for
    `Policy.experts` / `Policy.loss_terms` the parallelisms that would split what they need whole)."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(config)}
    for name, why in policy.refused.items():
        if getattr(config, name) != defaults[name]:
            raise ValueError(f"ShardConfig.{name}={getattr(config, name)!r} is not supported for "
                             f"{type(model).__name__} ({policy.name}.refused): {why}")
    if policy.experts and config.sp_mode == "split_gather":
        raise ValueError(f"ShardConfig.sp_mode='split_gather' is not supported for {type(model).__name__} "
                         f"({policy.name}.experts): the experts' tp all-reduce needs every rank to hold the same "
                         "tokens; use sp_mode='all_to_all' (or 'ring') on the sp axis")
    terms = [attr for attr in policy.loss_terms if getattr(model.config, attr, False)]
    if terms and (config.pp_size > 1 or config.sp_mode in ("all_to_all", "ring")):
        field = "pp_size" if config.pp_size > 1 else "sp_mode"
        raise ValueError(f"ShardConfig.{field}={getattr(config, field)!r} with model.config.{terms[0]}=True "
                         f"({policy.name}.loss_terms): HF adds a loss term computed from every layer's router "
                         "output over every token, which a pipeline stage or a sequence chunk does not see; "
                         f"set model.config.{terms[0]}=False or use tensor / split-free layouts")
