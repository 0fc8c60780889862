"""Route HF attention's ``apply_rotary_pos_emb`` through the fused rotary op.

Seam (transformers 5.x): ``LlamaAttention.forward`` calls the *module-level* function
``modeling_llama.apply_rotary_pos_emb``. The ``@use_kernelized_func(apply_rotary_pos_emb)`` class
decorator and ``@use_kernel_forward_from_hub("rotary_pos_emb")`` only do something when the
``kernels`` package is installed (they register the function for ``kernels.kernelize``, which
swaps in kernels from the Hub); without ``kernels`` both are no-op stubs. No per-instance hook
exists, so the only seam that works everywhere is rebinding that module global. That is what
``enable_fused_rotary`` does, for each modeling module the model's classes come from, after
checking the function's signature and numerically probing that it is the ``rotate_half`` RoPE
(interleaved variants are left alone). The rebinding is process-wide for that module (every
model of that family), reversible with ``disable_fused_rotary``, and harmless off-CUDA because
the fused op then runs the identical PyTorch formula.
"""

from __future__ import annotations

import inspect
import sys

import torch

from . import ops, reference

__all__ = ["enable_fused_rotary", "disable_fused_rotary", "fused_apply_rotary_pos_emb"]

_ORIGINALS: dict[str, object] = {}  # modeling module name -> original apply_rotary_pos_emb
_PARAMS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


def fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Same signature and result as HF ``apply_rotary_pos_emb``; CUDA kernel when possible."""
    return ops.apply_rotary(q, k, cos, sin, unsqueeze_dim)


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


def enable_fused_rotary(model: torch.nn.Module) -> list[str]:
    """Rebind ``apply_rotary_pos_emb`` in the modeling modules of ``model``'s classes.

    Returns the names of the modules now using the fused op (already-patched ones included).
    """
    done = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        mod = sys.modules.get(name)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is None:
            continue
        if fn is fused_apply_rotary_pos_emb:
            done.append(name)
            continue
        if not _is_rotate_half_rope(fn):
            continue
        _ORIGINALS[name] = fn
        setattr(mod, "apply_rotary_pos_emb", fused_apply_rotary_pos_emb)
        done.append(name)
    return done


def disable_fused_rotary() -> None:
    """Restore every ``apply_rotary_pos_emb`` that ``enable_fused_rotary`` replaced."""
    for name, fn in list(_ORIGINALS.items()):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "apply_rotary_pos_emb", None) is fused_apply_rotary_pos_emb:
            setattr(mod, "apply_rotary_pos_emb", fn)
        del _ORIGINALS[name]
