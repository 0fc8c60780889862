"""Phi-3 (`Phi3ForCausalLM`, `Phi3Model`): LLaMA-like, but q, k and v come from one fused
`qkv_proj` and gate and up from one fused `gate_up_proj`. Each is split per part (`packed`), so
a rank's output holds its own query, key and value heads (its own gate and up rows) in HF's
order and HF's forward slices / chunks it unchanged. Phi-3 slices at
`config.num_attention_heads * head_dim`, read from the attention's config in forward: the
attention gets a per-rank view of it (`attention_local_config`). KV heads packed with the
queries are not replicated: tp must divide `num_key_value_heads` (a ValueError says so).
The fused MLP kernel expects separate gate / up projections (not used); the rotary kernel is
not routed (Phi-3 may rotate only part of each head)."""
from __future__ import annotations

from .base import Policy, register_policy


@register_policy
class Phi3Policy(Policy):
    model_types = ("phi3",)
    embedding = "embed_tokens"
    layers = "layers"
    lm_head = "lm_head"
    column_parallel = ("self_attn.qkv_proj", "mlp.gate_up_proj")
    packed = {"self_attn.qkv_proj": ("num_attention_heads", "num_key_value_heads", "num_key_value_heads"),
              "mlp.gate_up_proj": ("intermediate_size", "intermediate_size")}
    row_parallel = ("self_attn.o_proj", "mlp.down_proj")
    tp_input_copies = {"input_layernorm": ("self_attn.qkv_proj",),
                       "post_attention_layernorm": ("mlp.gate_up_proj",)}
    attention = "self_attn"
    attention_local_attrs = {"num_key_value_groups": "groups", "num_key_value_heads": "kv_heads"}
    attention_local_config = {"num_attention_heads": "q_heads"}
    fused_norms = ("input_layernorm", "post_attention_layernorm")
    final_norm = "norm"
    fused_lm_loss = True
