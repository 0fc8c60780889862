"""Gemma 2 (`Gemma2ForCausalLM`, `Gemma2Model`) and Gemma 3 text (`Gemma3ForCausalLM` with a
`Gemma3TextConfig`, `Gemma3TextModel`).

LLaMA's split, with Gemma's differences handled by HF's own code on the local pieces:
  * attention soft-capping and sliding windows run inside HF's attention / mask code on this
    rank's heads; `query_pre_attn_scalar` is the attention module's own `scaling`;
  * final-logit soft-capping is elementwise, so it runs on the vocab-split logits before the
    vocab-parallel loss; the fused LM loss (which never builds logits) is not used while
    `config.final_logit_softcapping` is set (`logit_transforms`);
  * the token embedding multiplies its lookup by `sqrt(hidden_size)` (`Gemma*TextScaledWordEmbedding`):
    the vocab-parallel embedding keeps it (`embedding_scale`); tied embeddings are Gemma's default;
  * four norms per layer; the MLP's gate and up projections are read by the pre-feed-forward norm;
  * Gemma's RMSNorm scales by `(1 + weight)` and its MLP uses gelu(tanh): neither fused kernel
    applies (`fused_norms` empty, `fused_final_norm` False, no `fused_mlp`).
Gemma 3 adds per-head q / k norms, whole on every rank with gradients summed over tp (as Qwen3)."""
from __future__ import annotations

from .base import Policy, register_policy

_Q = ("self_attn.q_proj",)
_KV = ("self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


@register_policy
class Gemma2Policy(Policy):
    model_types = ("gemma2",)
    embedding = "embed_tokens"
    embedding_scale = "scalar_embed_scale"
    layers = "layers"
    lm_head = "lm_head"
    query_projections = _Q
    kv_projections = _KV
    column_parallel = _Q + _KV + _MLP_IN
    row_parallel = ("self_attn.o_proj", "mlp.down_proj")
    tp_input_copies = {"input_layernorm": _Q + _KV, "pre_feedforward_layernorm": _MLP_IN}
    attention = "self_attn"
    attention_local_attrs = {"num_key_value_groups": "groups"}
    final_norm = "norm"
    fused_final_norm = False
    fused_rotary = True
    fused_lm_loss = True
    logit_transforms = ("final_logit_softcapping",)


@register_policy
class Gemma3TextPolicy(Gemma2Policy):
    model_types = ("gemma3_text",)
    tp_partial = ("self_attn.q_norm", "self_attn.k_norm")
