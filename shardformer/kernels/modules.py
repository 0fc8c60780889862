"""Drop-in replacements for HF leaf modules that run the fused ops.

Each replacement *reuses* the original's parameters / submodules (same objects, same attribute
names), so parameter names, sharding metadata and checkpoints are unchanged; only ``forward``
differs, and it computes the same function (see ``reference.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops, reference

__all__ = ["FusedRMSNorm", "FusedSwiGLUMLP"]

_SILU_NAMES = ("silu", "swish")


class FusedRMSNorm(nn.Module):
    """``LlamaRMSNorm`` semantics: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, fp32 inside."""

    def __init__(self, weight: nn.Parameter, eps: float = 1e-6):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    @classmethod
    def from_hf(cls, module: nn.Module, check: bool = True) -> "FusedRMSNorm":
        """Wrap an HF RMSNorm, sharing its ``weight`` Parameter and eps.

        With ``check``, the module is run once on a small random input and must agree with the
        LLaMA formula (this rejects e.g. Gemma's ``(1 + weight)`` variant) — a ``ValueError``
        names the class otherwise.
        """
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
            raise ValueError(
                f"FusedRMSNorm.from_hf: {type(module).__name__} has no 1-D `weight` and "
                "`variance_epsilon`/`eps`; it is not an RMSNorm this kernel can replace")
        fused = cls(weight, float(eps))
        if check and weight.device.type != "meta":
            with torch.no_grad():
                gen = torch.Generator(device=weight.device).manual_seed(0)  # leave the global RNG alone
                x = torch.randn(3, weight.numel(), device=weight.device, dtype=weight.dtype, generator=gen)
                if not torch.allclose(module(x), reference.rms_norm(x, weight, float(eps)),
                                      rtol=1e-3, atol=1e-3):
                    raise ValueError(
                        f"FusedRMSNorm.from_hf: {type(module).__name__} does not compute "
                        "weight * x / rms(x) (LlamaRMSNorm semantics); refusing to replace it")
        return fused

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def forward_with_residual(self, hidden_states, residual):
        """``s = hidden_states + residual``; returns ``(norm(s), s)`` in one kernel."""
        return ops.rms_norm_residual(hidden_states, residual, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FusedSwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the activation and product fused.

    The three projections are the original submodules, only called (they may be parallel
    linears), so their parameters keep their names: ``gate_proj.weight`` etc.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    @classmethod
    def from_hf(cls, mlp: nn.Module) -> "FusedSwiGLUMLP":
        """Build from a LLaMA-style MLP; ``ValueError`` unless its activation is SiLU."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), nn.Module):
                raise ValueError(f"FusedSwiGLUMLP.from_hf: {type(mlp).__name__} has no submodule `{name}`")
        config = getattr(mlp, "config", None)
        act = getattr(config, "hidden_act", None)
        if act is not None:
            if act not in _SILU_NAMES:
                raise ValueError(
                    f"FusedSwiGLUMLP.from_hf: config.hidden_act={act!r} but the fused SwiGLU kernel "
                    f"computes silu(gate) * up; it needs config.hidden_act in {_SILU_NAMES}")
        elif not _is_silu(getattr(mlp, "act_fn", None)):
            raise ValueError(
                f"FusedSwiGLUMLP.from_hf: {type(mlp).__name__} has no config.hidden_act and its act_fn "
                f"{type(getattr(mlp, 'act_fn', None)).__name__} is not SiLU")
        fused = cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for attr in ("config", "hidden_size", "intermediate_size"):
            if hasattr(mlp, attr):
                setattr(fused, attr, getattr(mlp, attr))
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    if isinstance(act, nn.SiLU):
        return True
    return type(act).__name__ == "SiLUActivation"
