"""GPT-2 (`GPT2LMHeadModel`, `GPT2Model`): `Conv1D` layers (weight [in, out], the transpose of
`nn.Linear`'s: the parallel linears split its columns for column-parallel, its rows for
row-parallel, and compute it with addmm as HF does), a fused `c_attn` packing q, k and v along
its outputs (split per part, `packed`; the attention splits them at its `split_size`, set to
this rank's width), multi-head attention (no GQA), LayerNorms with bias (replicated), learned
positions `wpe` (replicated: every rank adds the whole position embedding), row-parallel
`c_proj`s whose bias is added once, after the all-reduce. LayerNorm and the GELU MLP have no
fused kernel here.
Refused at setup: pipeline parallelism (HF adds `wpe` to `inputs_embeds`, so a later stage fed
hidden states would add the positions again) and the sp-axis sequence modes all_to_all / ring
(GPT-2 reshapes the final hidden states to the whole sequence length, which they keep a chunk);
split_gather runs."""
from __future__ import annotations

from .base import Policy, register_policy


@register_policy
class GPT2Policy(Policy):
    model_types = ("gpt2",)
    embedding = "wte"
    position_embedding = "wpe"
    layers = "h"
    lm_head = "lm_head"
    column_parallel = ("attn.c_attn", "mlp.c_fc")
    packed = {"attn.c_attn": ("num_attention_heads", "num_attention_heads", "num_attention_heads")}
    row_parallel = ("attn.c_proj", "mlp.c_proj")
    tp_input_copies = {"ln_1": ("attn.c_attn",), "ln_2": ("mlp.c_fc",)}
    attention = "attn"
    attention_local_attrs = {"num_heads": "q_heads", "split_size": "q_width"}
    final_norm = "ln_f"
    fused_final_norm = False
    whole_sequence_output = True
    fused_lm_loss = True
