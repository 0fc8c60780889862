"""Pure-PyTorch reference kernels with exactly the semantics of the HF code they replace.

These run wherever the CUDA extension does not (CPU, unsupported dtypes) and are the oracle the
CUDA kernels are tested against. Each function spells out the same operations, in the same order
and dtypes, as the transformers module it stands for, so autograd gives identical gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cross_entropy import linear_cross_entropy  # noqa: F401  (re-export; reference backend)

__all__ = ["rms_norm", "rms_norm_residual", "rotate_half", "apply_rotary", "swiglu", "linear_cross_entropy"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``: ``weight * (x_f32 * rsqrt(mean(x_f32**2) + eps)).to(x.dtype)``.

    The normalisation runs in fp32; the result is cast back to the input dtype *before* the
    multiplication by ``weight``, so the output dtype is ``promote(weight.dtype, x.dtype)``.
    """
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with RMSNorm: ``s = x + residual``; returns ``(rms_norm(s), s)``.

    This is the decoder-layer pattern ``hidden = residual + hidden; residual = hidden;
    hidden = norm(hidden)``; the sum is taken in the input dtype, as HF does.
    """
    s = residual + x
    return rms_norm(s, weight, eps), s


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (HF's ``rotate_half``; odd sizes included)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` for q and k.

    ``cos``/``sin`` are ``[batch, seq, head_dim]`` and are unsqueezed at ``unsqueeze_dim`` to
    broadcast over the heads of ``q``/``k``.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the activation of ``LlamaMLP`` (``act_fn(gate_proj(x)) * up_proj(x)``)."""
    return F.silu(gate) * up
