"""Communication of each sequence-parallel mode per decoder layer, forward and backward, against the
textbook volume. Every collective is recorded (shardformer's own and torch.distributed's) with its
bytes (all-gather: the gathered tensor; reduce-scatter, all-reduce, all-to-all: the input) during
one training step of a 2-layer and of a 1-layer model; the difference is one decoder layer. The
test prints the table and requires it to equal the textbook one exactly: no other collective."""
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import shardformer as sf
from shardformer import comm

from .models import build

B, S, H, INTER, HEADS, KV, D = 1, 16, 64, 96, 8, 2, 8  # D: head_dim = H / HEADS
F32 = 4


def _record(calls, phase):
    def wrap(kind, fn, size_of):
        def recorded(*args, **kwargs):
            calls[(phase["now"], kind)] += size_of(args, kwargs)
            return fn(*args, **kwargs)

        return recorded

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    in_bytes = lambda a, k: nbytes(a[0])  # noqa: E731
    return [
        mock.patch.object(comm, "_all_gather", wrap("all_gather", comm._all_gather,
                                                   lambda a, k: nbytes(a[0]) * dist.get_world_size(a[2]))),
        mock.patch.object(comm, "_reduce_scatter", wrap("reduce_scatter", comm._reduce_scatter, in_bytes)),
        mock.patch.object(comm, "_all_reduce", wrap("all_reduce", comm._all_reduce, in_bytes)),
        mock.patch.object(comm, "_all_to_all", wrap("all_to_all", comm._all_to_all, in_bytes)),
        mock.patch.object(dist, "all_reduce", wrap("all_reduce", dist.all_reduce, in_bytes)),
        mock.patch.object(dist, "all_gather", wrap("all_gather", dist.all_gather,
                                                   lambda a, k: nbytes(a[1]) * len(a[0]))),
        mock.patch.object(dist, "batch_isend_irecv", wrap("send", dist.batch_isend_irecv,
                                                          lambda a, k: sum(nbytes(op.tensor) for op in a[0]
                                                                           if op.op is dist.isend))),
    ]


def _step_volume(config, layers):
    model = sf.shard_model(build("llama", num_hidden_layers=layers, hidden_size=H, intermediate_size=INTER,
                                 num_attention_heads=HEADS, num_key_value_heads=KV),
                           config=config)
    ids = torch.randint(1, 250, (B, S), generator=torch.Generator().manual_seed(0))
    calls, phase = Counter(), {"now": "forward"}
    patches = _record(calls, phase)
    for p in patches:
        p.start()
    try:
        loss = model(input_ids=ids, labels=ids).loss
        phase["now"] = "backward"
        loss.backward()
    finally:
        for p in patches:
            p.stop()
    return calls


def textbook(mode, world):
    """Per decoder layer, fp32, S divisible by the split."""
    layer_params = (H * H * 2 + H * KV * D * 2 + 3 * H * INTER + 2 * H) * F32
    flags = 9 * F32  # the reducer's one "had a gradient" entry per parameter (9 per layer)
    if mode == "ring":  # K and V (their own heads) travel sp - 1 hops forward; backward sp hops with dK, dV
        kv = B * KV * (S // world) * D * F32
        return {("forward", "send"): (world - 1) * 2 * kv, ("backward", "send"): world * 4 * kv,
                ("backward", "all_reduce"): layer_params + flags}  # gradient mean over dp x sp
    if mode == "split_gather":  # Megatron SP: g = all-gather, rs = reduce-scatter of [B, S, H]
        act = B * S * H * F32
        return {("forward", "all_gather"): 2 * act, ("forward", "reduce_scatter"): 2 * act,
                # re-gather of both inputs, and the gathers that undo both reduce-scatters
                ("backward", "all_gather"): 4 * act, ("backward", "reduce_scatter"): 2 * act,
                # the two norm weights' partial gradients, and k_proj's and v_proj's: 2 KV heads over
                # tp 4 are replicated twice, their gradients summed over the 2 replicas (tp, not sp)
                ("backward", "all_reduce"): 2 * H * F32 + 2 * (KV * D // 2) * H * F32}
    # Ulysses: q, k, v and the output each cross one all-to-all per direction; KV heads repeated
    # until they split over sp (2 -> 4 at sp 4)
    kv_after = KV * (world // __import__("math").gcd(KV, world))
    per_token = (HEADS + 2 * kv_after + HEADS) * D * F32
    a2a = B * (S // world) * per_token
    return {("forward", "all_to_all"): a2a, ("backward", "all_to_all"): a2a,
            ("backward", "all_reduce"): layer_params + flags}  # gradient mean over dp x sp


def check_volume(mode):
    world = dist.get_world_size()
    kwargs = dict(tp_size=world) if mode == "split_gather" else dict(sp_size=world)  # S divides 2 x world
    config = sf.ShardConfig(sp_mode=mode, check_batch=False, **kwargs)
    two, one = _step_volume(config, 2), _step_volume(config, 1)
    per_layer = {key: two[key] - one[key] for key in set(two) | set(one) if two[key] != one[key]}
    return per_layer


@pytest.mark.parametrize("mode", ["split_gather", "all_to_all", "ring"])
def test_communication_per_layer_is_textbook(pools, mode):
    measured = pools(4).run(check_volume, mode)[0]
    want = textbook(mode, 4)
    print(f"\n{mode}, world 4, B={B} S={S} H={H}: bytes per decoder layer")
    for key in sorted(set(want) | set(measured)):
        print(f"  {key[0]:8s} {key[1]:14s} measured {measured.get(key, 0):>9d}  textbook {want.get(key, 0):>9d}")
    assert measured == want


def check_split_owns_its_storage():
    """split_seq returns this rank's chunk in storage of its own, batch 1 (where the chunk of
    [1, S, H] along S is a contiguous view) and batch 2, S even and odd (padded first): a view
    would keep the whole sequence alive while a layer saves its chunk for backward."""
    out = []
    for batch in (1, 2):
        for seq in (S, S + 1):
            x = torch.randn(batch, seq, H)
            part = comm.split_seq(x, 1, dist.group.WORLD)
            expected = comm.pad_to_multiple(x, 1, 2).chunk(2, dim=1)[dist.get_rank()]
            out.append(torch.equal(part, expected) and part.is_contiguous()
                       and part.untyped_storage().nbytes() == expected.numel() * F32)
    return out


def test_split_owns_its_storage(pools):
    assert all(all(r) for r in pools(2).run(check_split_owns_its_storage))
