"""Shard a tiny LLaMA with tensor parallelism, train a few steps, compare with the unsharded model.

    torchrun --nproc_per_node 2 examples/quickstart.py

Every rank also trains an unsharded copy on the same batches (the oracle); the largest relative
differences (max|a-b| / max|b|) of the losses, gradients and final weights are printed. AdamW's
first steps move each weight by about lr * sign(grad), so fp32 rounding in near-zero gradient
entries shows up in the weights at ~1e-5..1e-4 even though the gradients agree to ~1e-6.
"""
import copy
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import shardformer as sf
from shardformer.sharding import gather_full
from shardformer.sharding import sharded_parameters


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


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
    tp_group = model.sf_mesh.get_group("tp")
    worst_loss = worst_grad = 0.0
    for step in range(int(os.environ.get("STEPS", 5))):
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = model.forward_backward(input_ids=ids, labels=ids)
        ref_loss = reference(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        worst_loss = max(worst_loss, rel(loss, ref_loss.detach()))
        ref_params = dict(reference.named_parameters())
        for name, p, spec in sharded_parameters(model):
            worst_grad = max(worst_grad, rel(gather_full(p.grad, spec, tp_group), ref_params[name].grad))
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.6f}  unsharded {ref_loss.item():.6f}")

    full = sf.full_state_dict(model)
    worst = max(rel(full[k], v) for k, v in reference.state_dict().items())
    if dist.get_rank() == 0:
        print(f"max relative difference to the unsharded model: loss {worst_loss:.1e}, "
              f"gradients {worst_grad:.1e}, weights after AdamW {worst:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
