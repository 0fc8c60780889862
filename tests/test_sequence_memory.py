"""Sequence parallelism saves activation memory: the bytes one decoder layer keeps for backward
per rank (counted with torch.autograd.graph.saved_tensors_hooks; parameters excluded, each
storage counted once) at a split of 4 are at most 0.3x those without the split, at sequence
length 1024 on a tiny config. The test prints the ratios."""
import pytest
import torch
import torch.distributed as dist

import shardformer as sf

from .models import build

SEQ = 1024


def _saved_bytes_of_one_layer(model, ids):
    """Activation bytes that decoder layer 1 saves for backward during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, state = set(), {"on": False, "bytes": 0}

    def pack(t):
        if state["on"]:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                state["bytes"] += t.untyped_storage().nbytes()
        return t

    layer = model.base_model.layers[1]
    handles = [layer.register_forward_pre_hook(lambda *a: state.__setitem__("on", True)),
               layer.register_forward_hook(lambda *a: state.__setitem__("on", False))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for h in handles:
            h.remove()
    return state["bytes"]


def check_layer_memory(mode):
    world = dist.get_world_size()
    dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4,
                max_position_embeddings=SEQ, num_hidden_layers=2)
    ids = torch.randint(1, 250, (1, SEQ), generator=torch.Generator().manual_seed(0))
    split_cfg = {"split_gather": dict(tp_size=world, sp_mode="split_gather"),
                 "all_to_all": dict(sp_size=world, sp_mode="all_to_all"),
                 "ring": dict(sp_size=world, sp_mode="ring")}[mode]
    measured = {}
    for name, kwargs in (("unsplit", dict(tp_size=1)), ("split", split_cfg)):
        model = sf.shard_model(build("llama", **dims), config=sf.ShardConfig(enable_fused_kernels=False, **kwargs))
        model.train()
        measured[name] = _saved_bytes_of_one_layer(model, ids)
    ratio = measured["split"] / measured["unsplit"]
    if dist.get_rank() == 0:
        print(f"{mode}: one layer saves {measured['unsplit'] / 2**20:.2f} MiB unsplit, "
              f"{measured['split'] / 2**20:.2f} MiB at a split of {world}: ratio {ratio:.3f}")
    return ratio


@pytest.mark.parametrize("mode", ["split_gather", "all_to_all", "ring"])
def test_saved_activations_shrink_with_the_split(pools, mode):
    ratios = pools(4).run(check_layer_memory, mode)
    print(mode, "ratios per rank:", [round(r, 3) for r in ratios])
    assert max(ratios) <= 0.3, ratios
