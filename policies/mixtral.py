"""Mixtral (`MixtralForCausalLM`, `MixtralModel`): LLaMA's attention with a mixture-of-experts
MLP. transformers 5.x stores the experts as one module (`mlp.experts`) with 3-D parameters and
picks its forward through `config._experts_implementation`; it is not substituted. Each expert's
intermediate dimension is split over tp (`experts`: gate/up packed parts column-wise, down
row-wise); the experts module's inputs are handed to the tp group and its output all-reduced
(see `shardformer/tensor_parallel/experts.py`). The router (`mlp.gate`) is replicated, so every
rank routes every token alike and the router aux loss (`output_router_logits=True`) equals the
unsharded one; while it is on, the fused LM loss is skipped (HF adds the aux term to the LM
loss) and pipelines / all_to_all / ring are refused (`loss_terms`). split_gather is refused
(the experts' all-reduce needs the same tokens on every tp rank). No fused SwiGLU (no dense MLP)."""
from __future__ import annotations

from .base import Policy, register_policy

_Q = ("self_attn.q_proj",)
_KV = ("self_attn.k_proj", "self_attn.v_proj")


@register_policy
class MixtralPolicy(Policy):
    model_types = ("mixtral",)
    embedding = "embed_tokens"
    layers = "layers"
    lm_head = "lm_head"
    query_projections = _Q
    kv_projections = _KV
    column_parallel = _Q + _KV
    row_parallel = ("self_attn.o_proj",)
    tp_input_copies = {"input_layernorm": _Q + _KV}
    experts = {"mlp.experts": {"gate_up_proj": "column", "down_proj": "row"}}
    packed = {"mlp.experts.gate_up_proj": ("intermediate_size", "intermediate_size")}
    attention = "self_attn"
    attention_local_attrs = {"num_key_value_groups": "groups"}
    fused_norms = ("input_layernorm", "post_attention_layernorm")
    final_norm = "norm"
    fused_rotary = True
    fused_lm_loss = True
    loss_terms = ("output_router_logits",)
