"""BERT (`BertForMaskedLM`, `BertForSequenceClassification`, `BertModel`): an encoder (no
causal mask) with post-LayerNorm residual blocks and word + position + token-type embeddings.

  * the word embedding is vocab-parallel; position / token-type embeddings and every LayerNorm
    are replicated;
  * query / key / value are column-parallel (heads split; `BertSelfAttention` gets per-rank
    `num_attention_heads` / `all_head_size`), `attention.output.dense` row-parallel; the
    intermediate dense column-parallel, `output.dense` row-parallel (biases added once). Each
    column-parallel linear hands its own input to the tp group (the layer's input also feeds
    the residual, so no producer's output can be handed over once for all of them);
  * the masked-LM decoder is tied to the word embedding and has its own bias (split with it;
    `cls.predictions.bias` is the same Parameter). BERT computes its loss itself with
    `CrossEntropyLoss` on the full logits, so the head is kept gathered (`gathered_lm_head`):
    its logits are all-gathered over tp in forward (labels unshifted, as HF's loss);
  * the pooler and classification head are replicated.
Refused at setup: pipeline parallelism (no `final_norm` boundary; HF adds the positions to
`inputs_embeds`) and sequence parallelism (post-LayerNorm blocks have no pre-norm boundary for
split_gather; the sp-axis modes' attention path is written for causal decoders)."""
from __future__ import annotations

from .base import Policy, register_policy

_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")


@register_policy
class BertPolicy(Policy):
    model_types = ("bert",)
    embedding = "embeddings.word_embeddings"
    layers = "encoder.layer"
    lm_head = "cls.predictions.decoder"
    query_projections = _QKV
    column_parallel = _QKV + ("intermediate.dense",)
    row_parallel = ("attention.output.dense", "output.dense")
    attention = "attention.self"
    attention_local_attrs = {"num_attention_heads": "q_heads", "all_head_size": "q_width"}
    num_kv_heads_attr = "num_attention_heads"
    gathered_lm_head = True
    refused = {"pp_size": "BERT is an encoder whose blocks are post-LayerNorm and whose embeddings add learned "
                          "positions; its pipeline stages are not supported",
               "sp_mode": "sequence parallelism is written for pre-norm causal decoders, not BERT's encoder"}
