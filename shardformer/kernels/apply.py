"""Substitute fused-kernel modules named by a policy (`ShardConfig(enable_fused_kernels=True)`).

Runs before tensor parallelism is applied and changes no parameter: `FusedRMSNorm` shares the
norm's weight, `FusedSwiGLUMLP` keeps the MLP's three projections (which tensor parallelism then
replaces by parallel linears as usual). A module the kernel cannot reproduce (say an MLP whose
activation is not SiLU) is left as HF wrote it, with a warning: the model stays the same model.
Without CUDA the modules run the PyTorch reference, which computes the HF formula exactly.
The rotary kernel has no module seam (see `rotary.py`): it is switched on only when the CUDA
extension is loaded, since elsewhere it would run the same formula as HF's function. Attention
stays transformers' own, on the fastest backend installed (see `attention.py`).
"""
from __future__ import annotations

import warnings

from torch import nn

from . import cuda
from .attention import select_attention
from .modules import FusedRMSNorm, FusedSwiGLUMLP
from .rotary import enable_fused_rotary


def _swap(model: nn.Module, path: str, build, policy, entry: str, relative: str) -> bool:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, name, None)
    if not isinstance(module, nn.Module):
        if relative in policy.optional:
            return False
        raise ValueError(f"policy {policy.name}.{entry}={relative!r} matches nothing at {path} in {type(model).__name__}")
    try:
        setattr(parent, name, build(module))
        return True
    except ValueError as err:
        warnings.warn(f"fused kernel not applied to {path}: {err}", stacklevel=3)
        return False


def apply_fused_kernels(model: nn.Module, policy, layers_path: str, base_path: str) -> list[str]:
    """Swap the policy's `fused_norms` (per layer and `final_norm`) and `fused_mlp`; return the
    paths swapped. `layers_path` locates the decoder layers, `base_path` ("" or "model.") the
    base model. Raises ValueError for an entry that matches nothing (unless `optional`)."""
    todo = []  # (path, builder, policy entry, entry value)
    for i in range(len(model.get_submodule(layers_path))):
        todo += [(f"{layers_path}.{i}.{n}", FusedRMSNorm.from_hf, "fused_norms", n) for n in policy.fused_norms]
        if policy.fused_mlp:
            todo.append((f"{layers_path}.{i}.{policy.fused_mlp}", FusedSwiGLUMLP.from_hf, "fused_mlp", policy.fused_mlp))
    if policy.final_norm:
        todo.append((base_path + policy.final_norm, FusedRMSNorm.from_hf, "final_norm", policy.final_norm))
    done = [path for path, build, entry, rel in todo if _swap(model, path, build, policy, entry, rel)]
    if policy.fused_rotary and cuda.available():
        enable_fused_rotary(model)
    select_attention(model)
    return done
