"""Property tests (hypothesis) of the split / pad / gather math of every parallel layer.

The layers are built for each simulated tp rank with a group of size one (collectives are then
the identity), and the per-rank outputs are combined as the collective would: concatenated
(column / LM head), summed (row, embedding). The vocab-parallel cross-entropy needs real
collectives: hypothesis draws in this process and each example runs on the gloo pool.
"""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shardformer.tensor_parallel.embedding import VocabParallelEmbedding
from shardformer.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead
from shardformer.tensor_parallel.loss import vocab_parallel_cross_entropy
from shardformer.sharding import ShardSpec, merge_pieces, padded_size, split_tensor

from .models import rel_err

TOL = 1e-5
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
tp_sizes = st.sampled_from([1, 2, 3, 4, 8])


@SETTINGS
@given(full=st.integers(1, 70), shards=st.integers(1, 9), replicas=st.integers(1, 3),
       other=st.integers(1, 5), dim=st.integers(0, 1))
def test_split_merge_roundtrip(full, shards, replicas, other, dim):
    shape = [full, other] if dim == 0 else [other, full]
    x = torch.randn(shape)
    spec = ShardSpec(dim, full, shards, replicas)
    pieces = [split_tensor(x, spec, r) for r in range(shards * replicas)]
    assert all(p.shape[dim] == spec.local for p in pieces)
    assert spec.local * shards == padded_size(full, shards) >= full
    assert torch.equal(merge_pieces(pieces, spec), x)
    for r, p in enumerate(pieces):  # real entries where valid, zeros (padding) after
        valid = spec.valid(r)
        if valid:
            assert torch.equal(p.narrow(dim, 0, valid), x.narrow(dim, spec.start(r), valid))
        assert not p.narrow(dim, valid, spec.local - valid).any()
    assert sum(spec.valid(r) for r in range(0, shards * replicas, replicas)) == full


@SETTINGS
@given(tp=tp_sizes, rows=st.integers(1, 6), n_in=st.integers(1, 20), per_rank=st.integers(1, 5),
       bias=st.booleans())
def test_column_parallel_linear(tp, rows, n_in, per_rank, bias):
    full = nn.Linear(n_in, per_rank * tp, bias=bias)
    x = torch.randn(rows, n_in)
    spec = ShardSpec(0, full.out_features, tp)
    outs = [ColumnParallelLinear.from_linear(full, spec, None, r)(x) for r in range(tp)]
    assert rel_err(torch.cat(outs, -1), full(x)) <= TOL


@SETTINGS
@given(tp=tp_sizes, rows=st.integers(1, 6), per_rank=st.integers(1, 5), n_out=st.integers(1, 20),
       bias=st.booleans())
def test_row_parallel_linear(tp, rows, per_rank, n_out, bias):
    full = nn.Linear(per_rank * tp, n_out, bias=bias)
    x = torch.randn(rows, per_rank * tp)
    spec = ShardSpec(1, full.in_features, tp)
    layers = [RowParallelLinear.from_linear(full, spec, None, r) for r in range(tp)]
    partial = sum(F.linear(x_r, layer.weight) for x_r, layer in zip(x.chunk(tp, -1), layers))
    assert rel_err(partial + (full.bias if bias else 0), full(x)) <= TOL
    if bias:  # the bias is added once, after the reduction, not by every rank
        x0 = x.chunk(tp, -1)[0]
        assert rel_err(layers[0](x0), F.linear(x0, layers[0].weight) + full.bias) <= TOL


@SETTINGS
@given(tp=tp_sizes, vocab=st.integers(8, 60), dim=st.integers(1, 9), pad=st.booleans(), seq=st.integers(1, 7))
def test_vocab_parallel_embedding(tp, vocab, dim, pad, seq):
    full = nn.Embedding(vocab, dim, padding_idx=3 if pad else None)
    ids = torch.randint(0, vocab, (2, seq))
    ids[0, 0] = vocab - 1  # the last token lives next to the padding
    spec = ShardSpec(0, vocab, tp)
    layers = [VocabParallelEmbedding.from_embedding(full, spec, None, r) for r in range(tp)]
    out = sum(layer(ids) for layer in layers)
    assert rel_err(out, full(ids)) <= TOL
    out.sum().backward()
    full(ids).sum().backward()
    grad = merge_pieces([layer.weight.grad for layer in layers], spec)
    assert rel_err(grad, full.weight.grad) <= TOL  # padding_idx row gets no gradient in both


@SETTINGS
@given(tp=tp_sizes, vocab=st.integers(8, 60), hidden=st.integers(1, 9), rows=st.integers(1, 5))
def test_vocab_parallel_lm_head(tp, vocab, hidden, rows):
    full = nn.Linear(hidden, vocab, bias=False)
    x = torch.randn(rows, hidden)
    spec = ShardSpec(0, vocab, tp)
    heads = [VocabParallelLMHead.from_linear(full, spec, None, r) for r in range(tp)]
    outs = [h(x) for h in heads]
    assert [o.shape[-1] for o in outs] == [spec.valid(r) for r in range(tp)]  # no padded logit
    assert [h.vocab_start for h in heads] == [spec.start(r) for r in range(tp)]
    assert rel_err(torch.cat(outs, -1), full(x)) <= TOL


def check_cross_entropy(logits, target, ignore_index):
    """On every rank: this rank's vocab slice -> per-row loss and logits gradient vs F.cross_entropy."""
    import torch.distributed as dist

    tp, rank = dist.get_world_size(), dist.get_rank()
    spec = ShardSpec(1, logits.shape[1], tp)
    local = split_tensor(logits, spec, rank).narrow(1, 0, spec.valid(rank)).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, spec.start(rank), dist.group.WORLD, ignore_index)
    full = logits.clone().requires_grad_()
    expect = F.cross_entropy(full, target, ignore_index=ignore_index, reduction="none")
    weights = torch.linspace(0.5, 1.5, target.numel())
    (loss * weights).sum().backward()
    (expect * weights).sum().backward()
    grad = full.grad.narrow(1, min(spec.start(rank), spec.full), spec.valid(rank))
    return rel_err(loss.detach(), expect.detach()), rel_err(local.grad, grad)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=st.integers(1, 9), vocab=st.integers(4, 41), scale=st.floats(0.1, 30.0), data=st.data())
def test_vocab_parallel_cross_entropy(pools, rows, vocab, scale, data):
    tp = data.draw(st.sampled_from([2, 4]))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows * vocab)) * scale
    target = torch.tensor(data.draw(st.lists(st.integers(-1, vocab - 1), min_size=rows, max_size=rows)))
    target[target == -1] = -100  # ignore_index rows
    for loss_err, grad_err in pools(tp).run(check_cross_entropy, logits, target, -100):
        assert loss_err <= TOL and grad_err <= TOL, (loss_err, grad_err)


def test_vocab_parallel_cross_entropy_empty_slice(pools):
    """vocab 5 over 4 ranks: the last rank's slice is padding only (no logits at all)."""
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([4, -100, 0, 2])
    for loss_err, grad_err in pools(4).run(check_cross_entropy, logits, target, -100):
        assert loss_err <= TOL and grad_err <= TOL, (loss_err, grad_err)
