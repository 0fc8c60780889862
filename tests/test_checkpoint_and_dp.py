"""save_pretrained writes a plain HF directory from any tp layout; the data-parallel gradient
reduction is bucketed and launched during backward."""
import copy
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import shardformer as sf
from shardformer.data_parallel import GradReducer

from .models import batch, build, rel_err


def check_save_pretrained(family, tp, tied, path):
    ref = build(family, tied=tied)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=tp))
    ids, labels = batch(2)
    model.forward_backward(input_ids=ids, labels=labels)  # change the weights so a stale copy shows
    ref(input_ids=ids, labels=labels).loss.backward()
    for m in (model, ref):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    sf.save_pretrained(model, path)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"], os.listdir(path)
    loaded = AutoModelForCausalLM.from_pretrained(path)  # plain transformers, no shardformer
    assert type(loaded).__name__ == type(ref).__name__
    assert loaded.config.vocab_size == 250 and loaded.get_input_embeddings().weight.shape[0] == 250
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied
    got, want = loaded.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    worst = max(rel_err(got[k], want[k]) for k in want)
    assert worst <= 1e-5, worst
    dist.barrier()
    return worst


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("qwen2", False)])
@pytest.mark.parametrize("tp", [2, 4])
def test_save_pretrained_loads_in_plain_transformers(pools, family, tied, tp):
    with tempfile.TemporaryDirectory() as d:
        pools(tp).run(check_save_pretrained, family, tp, tied, os.path.join(d, "out"))


def check_bucketed_overlap():
    """dp=4, tiny buckets: several buckets, most launched from the gradient hooks while backward
    still runs (not all at its end), and the gradients equal the all-rows reference."""
    ref = build("llama")
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=1))
    model.sf_grad_reducer.remove()  # replace the default reducer by one with 16 KiB buckets
    model.sf_grad_reducer = reducer = GradReducer(model, model.sf_groups, bucket_mb=1 / 64)
    ids, labels = batch(8)
    rank = dist.get_rank()
    model.forward_backward(input_ids=ids[2 * rank:2 * rank + 2], labels=labels[2 * rank:2 * rank + 2])
    ref(input_ids=ids, labels=labels).loss.backward()
    assert len(reducer.buckets) > 4, len(reducer.buckets)
    assert reducer.launches["during_backward"] == len(reducer.buckets), reducer.launches
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[name].grad) <= 1e-5, name
    return reducer.launches


def test_data_parallel_buckets_overlap_backward(pools):
    pools(4).run(check_bucketed_overlap)


def check_save_from_sequence_parallel(layout, path):
    ref = build("llama")
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(**layout))
    sf.save_pretrained(model, path)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    worst = max(rel_err(loaded.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert worst == 0, worst
    dist.barrier()
    return worst


@pytest.mark.parametrize("layout", [dict(tp_size=2, sp_mode="split_gather"), dict(sp_size=2, sp_mode="all_to_all"),
                                    dict(sp_size=2, sp_mode="ring")])
def test_save_pretrained_from_sequence_parallel(pools, layout):
    with tempfile.TemporaryDirectory() as d:
        pools(2).run(check_save_from_sequence_parallel, layout, os.path.join(d, "out"))


def check_save_from_layout(layout, path):
    """Train one step in `layout` (ZeRO wrapped where asked), save, load with plain
    from_pretrained: every tensor equals the sharded model's own full state."""
    ids, labels = batch(4)
    model = sf.shard_model(build("llama", tied=True), config=sf.ShardConfig(**layout))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if layout.get("zero_stage"):
        opt = sf.ZeroOptimizer(opt, model)
    rows = 4 // model.sf_mesh["dp"].size()
    rank = model.sf_mesh.get_local_rank("dp")
    model.forward_backward(input_ids=ids[rows * rank:rows * (rank + 1)], labels=labels[rows * rank:rows * (rank + 1)])
    opt.step()
    full = sf.full_state_dict(model)
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, full)
    merged = {k: v for part in held for k, v in part.items()}
    sf.save_pretrained(model, path)
    dist.barrier()
    loaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert set(loaded) == set(build("llama", tied=True).state_dict())
    for name, tensor in loaded.items():
        assert torch.equal(tensor, merged[name]), name
    dist.barrier()
    return True


@pytest.mark.parametrize("layout", [dict(zero_stage=1), dict(zero_stage=2, tp_size=2), dict(zero_stage=3),
                                    dict(zero_stage=3, tp_size=2), dict(pp_size=2, zero_stage=2),
                                    dict(pp_size=2, tp_size=2, sp_mode="split_gather"), dict(pp_size=2, zero_stage=3)])
def test_save_pretrained_from_every_layout(pools, layout):
    """ZeRO 1-3 (with and without tp), pipeline with ZeRO-2 and ZeRO-3, pipeline x split_gather: the saved
    directory loads with plain from_pretrained and holds exactly the trained weights."""
    with tempfile.TemporaryDirectory() as d:
        pools(4).run(check_save_from_layout, layout, os.path.join(d, "out"))


def check_unfrozen_after_sharding():
    """A parameter frozen at shard_model and unfrozen later has no reduction hooks: forward_backward
    refuses it on every rank (only rank 0 unfreezes) instead of letting the replicas drift apart."""
    model = build("llama")
    model.model.norm.weight.requires_grad_(False)
    model = sf.shard_model(model, config=sf.ShardConfig())
    if dist.get_rank() == 0:
        model.model.norm.weight.requires_grad_(True)
    ids, labels = batch(2)
    with pytest.raises(ValueError, match="made trainable after shard_model") as raised:
        model.forward_backward(input_ids=ids, labels=labels)
    assert dist.get_rank() == 0 or "rank 0" in str(raised.value)
    return True


def test_parameter_unfrozen_after_sharding_is_refused(pools):
    assert pools(2).run(check_unfrozen_after_sharding) == [True, True]


def check_max_shard_size(layout, path, limit):
    """Files of at most `limit` bytes (or one tensor), HF's names and index, the trained weights;
    a writer never holds more than `limit` plus one tensor."""
    from safetensors import safe_open

    from shardformer.checkpoint import save as save_module

    ref = build("llama", tied=True)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(**layout))
    full = sf.full_state_dict(model)
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, full)
    merged = {k: v for part in held for k, v in part.items()}
    peak = [0]
    add = save_module._ShardWriter.add

    def counting_add(self, name, tensor):
        add(self, name, tensor)
        peak[0] = max(peak[0], self.size)

    save_module._ShardWriter.add = counting_add
    try:
        sf.save_pretrained(model, path, max_shard_size=limit)
    finally:
        save_module._ShardWriter.add = add
    dist.barrier()
    largest = max(v.numel() * v.element_size() for v in merged.values())
    assert peak[0] <= limit + largest, (peak[0], limit, largest)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) > 2 and files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        total = sum(torch.Size(s).numel() * 4 for s in sizes)
        assert total <= limit or len(sizes) == 1, (name, total)
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)  # the real class (not FSDP2's renamed one at ZeRO-3) and the weights' dtype
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["dtype"] == "float32", saved
    loaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert set(loaded) == set(ref.state_dict())
    for name, tensor in loaded.items():
        assert torch.equal(tensor, merged[name]), name
    dist.barrier()
    return len(files)


@pytest.mark.parametrize("layout", [dict(tp_size=2), dict(pp_size=2, tp_size=2), dict(zero_stage=3, tp_size=2)])
def test_save_pretrained_max_shard_size(pools, layout):
    """`max_shard_size` from a tp, a pipeline and a ZeRO-3 layout: several files, each within the
    limit, one index, loads with plain from_pretrained."""
    with tempfile.TemporaryDirectory() as d:
        counts = pools(4).run(check_max_shard_size, layout, os.path.join(d, "out"), 60_000)
        print(f"\n{layout}: {counts[0]} files of at most 60000 B")
