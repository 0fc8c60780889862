"""Substitute fused-kernel modules named by a policy (`ShardConfig(enable_fused_kernels=True)`).

Planned (every entry resolved, nothing changed) with the rest of the layout, applied first in
`shard_model`'s fixed order, before tensor parallelism, and changes no parameter: `FusedRMSNorm` shares the
norm's weight, `FusedSwiGLUMLP` keeps the MLP's three projections (which tensor parallelism then
replaces by parallel linears as usual). A module the kernel cannot reproduce (say an MLP whose
activation is not SiLU) is left as HF wrote it, with a warning: the model stays the same model.
Without the extension (no CUDA, a failed build, `SHARDFORMER_KERNELS=off`) nothing is
substituted, so the default costs no step time where no kernel runs: the modules' PyTorch
references compute HF's formula exactly but gain nothing, and the chunked LM loss (which never
builds the full logits) took about 4 % more step time on CPU (`benchmarks/fused_cpu.py`).
`SHARDFORMER_FUSED_LOSS=always` keeps the chunked loss without the extension (less memory; the
test suite runs that way, so both loss paths are tested on CPU). The rotary kernel has no module seam (see `kernels/rotary.py`): it is switched on, for this
model's attention modules only, when the CUDA extension is loaded, since elsewhere it would run
the same formula as HF's function. Attention
stays transformers' own, on the fastest backend installed (see `attention.py`).
"""
from __future__ import annotations

import os
import warnings

from torch import nn

from .kernels import cuda
from .kernels.attention import select_attention
from .kernels.modules import FusedRMSNorm, FusedSwiGLUMLP
from .kernels.rotary import enable_fused_rotary


def fused_loss_pays() -> bool:
    """Whether `enable_fused_kernels` uses the chunked LM loss here (see module docstring)."""
    value = os.environ.get("SHARDFORMER_FUSED_LOSS", "auto")
    if value not in ("auto", "always"):
        raise ValueError(f"SHARDFORMER_FUSED_LOSS={value!r}: expected 'auto' or 'always'")
    return value == "always" or cuda.available()


def plan_fused_kernels(model: nn.Module, policy, layers_path: str, base_path: str) -> list:
    """(path, module, builder) for the policy's `fused_norms` (per layer and `final_norm`) and
    `fused_mlp`, resolved without changing anything. `layers_path` locates the decoder layers,
    `base_path` ("" or "model.") the base model. Raises ValueError for an entry that matches
    nothing (naming it) unless `optional`."""
    todo = []  # (root path, entry value, builder, policy entry)
    for i in range(len(model.get_submodule(layers_path))):
        todo += [(f"{layers_path}.{i}", n, FusedRMSNorm.from_hf, "fused_norms") for n in policy.fused_norms]
        if policy.fused_mlp:
            todo.append((f"{layers_path}.{i}", policy.fused_mlp, FusedSwiGLUMLP.from_hf, "fused_mlp"))
    if policy.final_norm and policy.fused_final_norm:
        todo.append((base_path.rstrip("."), policy.final_norm, FusedRMSNorm.from_hf, "final_norm"))
    found = []
    for root_path, relative, build, entry in todo:
        root = model.get_submodule(root_path) if root_path else model
        try:
            module = policy.resolve(root, relative, root_path or type(model).__name__, entry)
        except ValueError:
            if relative in policy.optional:
                continue
            raise
        found.append((f"{root_path}.{relative}" if root_path else relative, module, build))
    return found


def apply_fused_kernels(model: nn.Module, policy, planned: list, attention_paths: list[str],
                        choose_attention: bool = True) -> list[str]:
    """Swap the `planned` modules (from `plan_fused_kernels`); route the rotary embedding of the
    attention modules at `attention_paths` to the fused kernel (CUDA only); pick the attention
    backend unless `choose_attention` is False (a layout that wraps the model's attention keeps
    it as it is). Returns the paths swapped; a module the kernel cannot reproduce is left as it
    is, with a warning."""
    done = []
    if not cuda.available():  # the references would only replace HF's modules by the same formula, slower
        planned = []
    for path, module, build in planned:
        try:
            policy.replace(model, path, build(module))
            done.append(path)
        except ValueError as err:
            warnings.warn(f"fused kernel not applied to {path}: {err}", stacklevel=2)
    if policy.fused_rotary and cuda.available() and cuda.enabled("rotary"):
        enable_fused_rotary(model, [model.get_submodule(p) for p in attention_paths])
    if choose_attention:
        select_attention(model)
    return done
