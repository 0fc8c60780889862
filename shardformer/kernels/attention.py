"""Attention backend under ``enable_fused_kernels``: shardformer ships no attention kernel.

transformers' own attention functions run, chosen through its seam
``PreTrainedModel.set_attn_implementation`` (never a copied forward). SDPA is transformers' default
and stays the default here: on CUDA it dispatches to PyTorch's flash / cuDNN / memory-efficient
kernels. When the ``flash-attn`` package is installed, the model's attention is ``"sdpa"`` and its
weights are fp16/bf16 on CUDA, it is switched to ``"flash_attention_2"`` (flash-attn refuses fp32
inputs, so fp32-weight models stay on SDPA). Any other setting (``"eager"`` for attention weights,
flex attention, a hub kernel) was the user's choice and is kept.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import nn

__all__ = ["flash_attn_installed", "select_attention"]

_HALF = (torch.float16, torch.bfloat16)


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _half_on_cuda(model: nn.Module) -> bool:
    params = list(model.parameters())
    return bool(params) and all(p.device.type == "cuda" and p.dtype in _HALF for p in params)


def select_attention(model: nn.Module) -> str | None:
    """Switch ``model`` from SDPA to flash-attn 2 where that is possible; return the implementation in use."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if (current != "sdpa" or not flash_attn_installed() or not hasattr(model, "set_attn_implementation")
            or not _half_on_cuda(model)):
        return current
    try:
        model.set_attn_implementation("flash_attention_2")
    except (ImportError, ValueError) as err:
        warnings.warn(f"flash-attn is installed but transformers refused it ({err}); keeping SDPA", stacklevel=2)
    return model.config._attn_implementation
