"""FLOPs per token (the convention is in examples/benchmark.py's docstring and DESIGN.md)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def count_flops(config, seq: int) -> dict:
    """FLOPs per token = 6 N + 12 L H S (the module docstring says what N counts)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}  # a tied matrix once
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    n = sum(unique.values()) - (0 if tied else embedding.numel())
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq
    return {"params_unique": sum(unique.values()), "params_embedding": embedding.numel(), "params_N": n,
            "tied_embeddings": tied, "flops_per_token": 6 * n + attention, "flops_per_token_attention": attention,
            "convention": "6*N + 12*L*H*S; N = unique parameters except the input embedding's lookup "
                          "(tied: the shared matrix counted once, as the LM head); full attention"}
