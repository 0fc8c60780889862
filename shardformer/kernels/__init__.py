"""Fused kernels: CUDA (``csrc/``) when available, PyTorch reference with identical semantics otherwise.

Layers: ``reference`` (eager oracle) -> ``ops`` (dispatch + autograd) -> ``modules`` (drop-in HF
replacements) and ``rotary`` (routes HF ``apply_rotary_pos_emb`` to the fused op).
"""

from .cuda import available
from .modules import FusedRMSNorm, FusedSwiGLUMLP
from .ops import apply_rotary, linear_cross_entropy, rms_norm, rms_norm_residual, swiglu
from .rotary import disable_fused_rotary, enable_fused_rotary

__all__ = [
    "available", "FusedRMSNorm", "FusedSwiGLUMLP", "apply_rotary", "linear_cross_entropy",
    "rms_norm", "rms_norm_residual", "swiglu", "enable_fused_rotary", "disable_fused_rotary",
]
