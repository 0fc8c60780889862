"""Route HF attention's ``apply_rotary_pos_emb`` through the fused rotary op, for chosen models only.

Seam (transformers 5.x): ``LlamaAttention.forward`` calls the *module-level* function
``modeling_llama.apply_rotary_pos_emb``. The ``@use_kernelized_func(apply_rotary_pos_emb)`` class
decorator and ``@use_kernel_forward_from_hub("rotary_pos_emb")`` only do something when the
``kernels`` package is installed; without it both are no-op stubs. No per-instance hook exists, so
``enable_fused_rotary(model)`` rebinds that module global to a dispatcher (after checking the
function's signature and numerically probing that it is the ``rotate_half`` RoPE; interleaved
variants are left alone) and scopes it: the dispatcher runs the fused op only while one of the
given attention modules (by default every module of ``model`` whose forward calls the function)
is running, counted by a forward pre-hook and an always-called forward hook on each. Every other
model of the family, sharded or not, keeps HF's function. Gradient checkpointing re-runs the
same modules, so the recomputation uses the same op. ``disable_fused_rotary`` restores the
globals and removes the hooks.
"""

from __future__ import annotations

import inspect
import sys

import torch

from . import ops, reference

__all__ = ["enable_fused_rotary", "disable_fused_rotary", "fused_apply_rotary_pos_emb"]

_ORIGINALS: dict[str, object] = {}  # modeling module name -> original apply_rotary_pos_emb
_HOOKS: list = []  # hook handles of the scoped modules
_ACTIVE = [0]  # how many scoped modules are running (nested calls count)
_PARAMS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


def fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Same signature and result as HF ``apply_rotary_pos_emb``; CUDA kernel when possible."""
    return ops.apply_rotary(q, k, cos, sin, unsqueeze_dim)


def _dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _ACTIVE[0]:
            return fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.sf_original = original
    return apply_rotary_pos_emb


def _is_rotate_half_rope(fn) -> bool:
    try:
        if list(inspect.signature(fn).parameters) != _PARAMS:
            return False
    except (TypeError, ValueError):
        return False
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 1, 5, 8, generator=gen)
    cos, sin = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    try:
        with torch.no_grad():
            got = fn(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - any failure means "not the function we replace"
        return False
    want = reference.apply_rotary(q, k, cos, sin)
    return all(torch.allclose(g, w, rtol=1e-6, atol=1e-6) for g, w in zip(got, want))


def _enter(module, args):
    _ACTIVE[0] += 1


def _leave(module, args, output):
    _ACTIVE[0] -= 1


def _calls_rotary(module: torch.nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    if forward is None:
        return False
    code = getattr(inspect.unwrap(forward), "__code__", None)  # HF decorates forwards
    return "apply_rotary_pos_emb" in getattr(code, "co_names", ())


def enable_fused_rotary(model: torch.nn.Module, modules=None) -> list[str]:
    """Use the fused op inside ``modules`` (default: every submodule of ``model`` whose forward
    calls ``apply_rotary_pos_emb``), rebinding that global in the modeling modules of
    ``model``'s classes to the scoped dispatcher.

    Returns the names of the modeling modules whose function is routed (already-routed ones
    included); the modules are scoped only when at least one is.
    """
    done = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        mod = sys.modules.get(name)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is None:
            continue
        if getattr(fn, "sf_original", None) is not None:
            done.append(name)
            continue
        if not _is_rotate_half_rope(fn):
            continue
        _ORIGINALS[name] = fn
        setattr(mod, "apply_rotary_pos_emb", _dispatcher(fn))
        done.append(name)
    if done:
        scoped = [m for m in model.modules() if _calls_rotary(m)] if modules is None else list(modules)
        for m in scoped:
            if getattr(m, "sf_fused_rotary", False):
                continue
            m.sf_fused_rotary = True
            _HOOKS.append((m, m.register_forward_pre_hook(_enter), m.register_forward_hook(_leave, always_call=True)))
    return done


def disable_fused_rotary() -> None:
    """Restore every ``apply_rotary_pos_emb`` that ``enable_fused_rotary`` replaced and unscope
    every module."""
    for name, fn in list(_ORIGINALS.items()):
        mod = sys.modules.get(name)
        if mod is not None and getattr(getattr(mod, "apply_rotary_pos_emb", None), "sf_original", None) is fn:
            setattr(mod, "apply_rotary_pos_emb", fn)
        del _ORIGINALS[name]
    for module, *handles in _HOOKS:
        for handle in handles:
            handle.remove()
        module.sf_fused_rotary = False
    _HOOKS.clear()
    _ACTIVE[0] = 0
