"""Shard a tiny LLaMA with tensor parallelism, train a few steps, compare with the unsharded model.

    torchrun --nproc_per_node 2 examples/quickstart.py

Every rank also trains an unsharded copy on the same batches (the oracle) and, at the end, the
largest relative difference between the two models' weights is printed.
"""
import copy
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import shardformer as sf


def main():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    world = dist.get_world_size()
    config = LlamaConfig(
        vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    reference = LlamaForCausalLM(config)
    model = sf.shard_model(copy.deepcopy(reference), config=sf.ShardConfig(tp_size=world))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for step in range(int(os.environ.get("STEPS", 5))):
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = model.forward_backward(input_ids=ids, labels=ids)
        ref_loss = reference(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.6f}  unsharded {ref_loss.item():.6f}")

    full = sf.full_state_dict(model)
    worst = max(
        ((full[k] - v).abs().max() / v.abs().max()).item() for k, v in reference.state_dict().items()
    )
    if dist.get_rank() == 0:
        print(f"max relative weight difference to the unsharded model: {worst:.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
