"""The LLaMA family: LLaMA, Mistral and Qwen2 share one declaration (Qwen2's qkv bias is split
with its weight automatically). Serves *ForCausalLM, *Model and *ForSequenceClassification."""
from __future__ import annotations

from .base import Policy, register_policy


@register_policy
class LlamaPolicy(Policy):
    model_types = ("llama",)
    embedding = "embed_tokens"
    layers = "layers"
    lm_head = "lm_head"
    query_projections = ("self_attn.q_proj",)
    kv_projections = ("self_attn.k_proj", "self_attn.v_proj")
    column_parallel = query_projections + kv_projections + ("mlp.gate_proj", "mlp.up_proj")
    row_parallel = ("self_attn.o_proj", "mlp.down_proj")
    tp_input_copies = {"input_layernorm": query_projections + kv_projections,
                       "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
    attention = "self_attn"
    attention_local_attrs = {"num_key_value_groups": "groups"}
    fused_norms = ("input_layernorm", "post_attention_layernorm")
    final_norm = "norm"
    fused_mlp = "mlp"
    fused_rotary = True
    fused_lm_loss = True


@register_policy
class MistralPolicy(LlamaPolicy):
    model_types = ("mistral",)


@register_policy
class Qwen2Policy(LlamaPolicy):
    model_types = ("qwen2",)
