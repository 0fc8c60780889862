"""OLMo 2 / OLMo 3 (`Olmo2ForCausalLM`, `Olmo3ForCausalLM`) and OLMoE (`OlmoeForCausalLM`).

LLaMA's split, with two differences:
  * `q_norm` / `k_norm` are RMSNorms over the whole query / key projection (all heads together),
    not per head: each rank holds its heads' features, so they become `split_norms` (the weight
    split as the projection's outputs, each row's sum of squares all-reduced over tp; with KV
    heads replicated, the replicas counted once);
  * OLMo 2 / 3 normalise after attention and after the MLP (post-norm, no norm before q/k/v), so
    no module's output feeds the column linears alone: each column linear hands its own input to
    the tp group (no `tp_input_copies`). Their RMSNorms cast to the input dtype after the weight
    (LLaMA's before it), so the fused RMSNorm kernel is not used for them.
OLMo 3's sliding windows run in HF's own mask code on this rank's heads (ring attention refuses
them). OLMoE is pre-norm with LLaMA's RMSNorm (fused kernel allowed); its experts are split as
Mixtral's (router replicated; its aux loss a `loss_term`)."""
from __future__ import annotations

from .base import Policy, register_policy

_Q = ("self_attn.q_proj",)
_KV = ("self_attn.k_proj", "self_attn.v_proj")
_NORMS = {"self_attn.q_norm": "self_attn.q_proj", "self_attn.k_norm": "self_attn.k_proj"}


@register_policy
class Olmo2Policy(Policy):
    model_types = ("olmo2", "olmo3")
    embedding = "embed_tokens"
    layers = "layers"
    lm_head = "lm_head"
    query_projections = _Q
    kv_projections = _KV
    column_parallel = _Q + _KV + ("mlp.gate_proj", "mlp.up_proj")
    row_parallel = ("self_attn.o_proj", "mlp.down_proj")
    split_norms = _NORMS
    attention = "self_attn"
    attention_local_attrs = {"num_key_value_groups": "groups"}
    final_norm = "norm"
    fused_final_norm = False
    fused_mlp = "mlp"
    fused_rotary = True
    fused_lm_loss = True


@register_policy
class OlmoePolicy(Policy):
    model_types = ("olmoe",)
    embedding = "embed_tokens"
    layers = "layers"
    lm_head = "lm_head"
    query_projections = _Q
    kv_projections = _KV
    column_parallel = _Q + _KV
    row_parallel = ("self_attn.o_proj",)
    tp_input_copies = {"input_layernorm": _Q + _KV}
    split_norms = _NORMS
    experts = {"mlp.experts": {"gate_up_proj": "column", "down_proj": "row"}}
    packed = {"mlp.experts.gate_up_proj": ("intermediate_size", "intermediate_size")}
    attention = "self_attn"
    attention_local_attrs = {"num_key_value_groups": "groups"}
    fused_norms = ("input_layernorm", "post_attention_layernorm")
    final_norm = "norm"
    fused_rotary = True
    fused_lm_loss = True
    loss_terms = ("output_router_logits",)
