"""`sf.split_batch`: a loader of a sequence-parallel model passes only this rank's shard of the
sequence; the step is bit for bit the one of the whole batch (and that one is the unsharded
model's, fp32 1e-5), in every mode, for lengths the split does not divide; a mix of shards and
whole batches, or of lengths, raises on every rank instead of hanging."""
import copy

import pytest
import torch
import torch.distributed as dist

import shardformer as sf
from shardformer.sharding import local

from .models import batch, build, rel_err
from .test_equivalence import TOL


def _grads(model):
    return {n: local(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def check_split_batch(config_kwargs, seq):
    ref = build("llama", num_hidden_layers=2)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(**config_kwargs))
    dp, rank = model.sf_mesh["dp"].size(), model.sf_mesh.get_local_rank("dp")
    ids, labels = batch(2 * dp, seq=seq)
    mine = {"input_ids": ids[2 * rank:2 * rank + 2], "labels": labels[2 * rank:2 * rank + 2]}
    whole_loss = model.forward_backward(**mine)
    whole_grads = _grads(model)
    model.zero_grad()
    shard = sf.split_batch(mine, model)
    size = model.sf_groups.size("tp" if config_kwargs["sp_mode"] == "split_gather" else "sp")
    assert shard["input_ids"].shape[1] < seq and shard["sf_sequence_length"] == seq
    loss = model.forward_backward(**shard)
    grads = _grads(model)
    assert torch.equal(loss, whole_loss) and grads.keys() == whole_grads.keys()
    assert all(torch.equal(grads[n], whole_grads[n]) for n in grads)
    assert torch.equal(model.forward_loss(**shard), model.forward_loss(**mine))
    with torch.no_grad():
        assert torch.equal(model(**shard).loss, model(**mine).loss)
    ref_loss = ref(input_ids=ids, labels=labels).loss.detach()
    return size, rel_err(loss, ref_loss)


@pytest.mark.parametrize("config_kwargs", [dict(tp_size=2, sp_mode="split_gather"),
                                           dict(sp_size=2, sp_mode="all_to_all"),
                                           dict(sp_size=2, sp_mode="ring"),
                                           dict(sp_size=4, sp_mode="ring")])
def test_split_batch_is_the_whole_batch(pools, config_kwargs):
    results = pools(4).run(check_split_batch, config_kwargs, 13)
    assert all(size > 1 and err <= TOL for size, err in results), results


def _raises_everywhere(fn, *fragments):
    with pytest.raises(ValueError) as raised:
        fn()
    assert all(f in str(raised.value) for f in fragments), str(raised.value)


def check_split_mistakes():
    model = sf.shard_model(build("llama", num_hidden_layers=2), config=sf.ShardConfig(sp_size=2, sp_mode="all_to_all"))
    sp_rank, rank = model.sf_mesh.get_local_rank("sp"), dist.get_rank()
    ids, labels = batch(2, seq=12)
    whole = {"input_ids": ids, "labels": labels}
    plain = sf.shard_model(build("llama", num_hidden_layers=2), config=sf.ShardConfig())
    _raises_everywhere(lambda: sf.split_batch(whole, plain), "ShardConfig.sp_mode=None")
    _raises_everywhere(lambda: sf.split_batch(dict(whole, labels=labels[:, :5]), model), "labels")
    # rank 0 passes a shard, the others the whole batch: every rank raises (no rank is left waiting)
    _raises_everywhere(lambda: model.forward_backward(**(sf.split_batch(whole, model) if rank == 0 else whole)),
                       "split_batch")
    # one dp replica's sp ranks split batches of different lengths
    ids13, labels13 = batch(2, seq=13)
    uneven = {"input_ids": ids13, "labels": labels13} if sp_rank == 1 else whole
    _raises_everywhere(lambda: model.forward_backward(**sf.split_batch(uneven, model)), "different batches")
    _raises_everywhere(lambda: model(**(sf.split_batch(whole, model) if sp_rank == 0 else whole)), "different batches")
    tampered = dict(sf.split_batch(whole, model), sf_sequence_length=20)
    _raises_everywhere(lambda: model.forward_backward(**tampered), "sf_sequence_length=20")
    loss = model.forward_backward(**sf.split_batch(whole, model))  # the ranks are still in step
    return bool(torch.isfinite(loss))


def test_split_batch_mistakes_raise_on_every_rank(pools):
    assert pools(4).run(check_split_mistakes) == [True] * 4
