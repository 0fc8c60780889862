"""Qwen3: the LLaMA declaration plus per-head RMSNorms on the queries and keys (`q_norm`,
`k_norm`, one weight of head size shared by every head). They stay whole on every tp rank; each
rank normalises only its own heads, so their gradients are summed over tp (`tp_partial`)."""
from __future__ import annotations

from .base import register_policy
from .llama import LlamaPolicy


@register_policy
class Qwen3Policy(LlamaPolicy):
    model_types = ("qwen3",)
    tp_partial = ("self_attn.q_norm", "self_attn.k_norm")
