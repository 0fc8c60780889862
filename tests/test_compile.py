"""torch.compile of a sharded model with fused kernels: one graph, no graph break, same loss and
gradients as the unsharded model. The dynamo front end (where graph breaks happen) is the same for
every backend; "aot_eager" also traces the backward and keeps the CPU test fast.
The sharded model's forward wrapper (fused loss, logits gather) is traced with it: one graph,
whatever the number of layers (4 here). Inductor is run as
well (about 30 s on 2 cores): it lowers the functional collectives and generates its own kernels."""
import copy

import pytest

import shardformer as sf

from .models import batch, build, grad_errors, rel_err


def check_compiled(tp, backend="aot_eager"):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = build("llama", tied=True, num_hidden_layers=4)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=tp, enable_fused_kernels=True))
    compiled = torch.compile(model, backend=backend)
    ids, labels = batch(2)
    loss = compiled(input_ids=ids, labels=labels).loss
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    print(f"tp={tp} {backend}: graph breaks {breaks}, graphs {graphs}")
    assert breaks == 0, dict(counters["graph_break"])
    assert graphs == 1, graphs
    assert rel_err(loss.detach(), ref_loss.detach()) <= 1e-5
    for name, err in grad_errors(model, ref).items():
        assert err <= 1e-5, name
    return breaks


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: its own kernels, collectives lowered
def test_compile_sharded_model_without_graph_breaks(pools, backend):
    assert pools(2).run(check_compiled, 2, backend) == [0, 0]


def check_compiled_shapes_and_batch_check(tp):
    """The batch check inside the compiled forward: no graph break as sequence lengths change
    (dynamic shapes), and tp peers fed different batches still raise (a device-side assert
    under compile: RuntimeError on CPU)."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = sf.shard_model(build("llama", tied=True), config=sf.ShardConfig(tp_size=tp))
    compiled = torch.compile(model, backend="aot_eager")
    for seq in (12, 10, 9, 8):
        ids, labels = batch(2, seq=seq)
        compiled(input_ids=ids, labels=labels).loss.backward()
    breaks = sum(counters["graph_break"].values())
    assert breaks == 0, dict(counters["graph_break"])
    ids, labels = batch(2, seq=8, seed=torch.distributed.get_rank() + 5)
    with pytest.raises(RuntimeError, match="received different batches"):
        compiled(input_ids=ids, labels=labels)
    return breaks


def test_compiled_batch_check(pools):
    assert pools(2).run(check_compiled_shapes_and_batch_check, 2) == [0, 0]


def check_compiled_sequence_parallel(mode):
    """Each sequence-parallel mode compiles to one graph without a break (aot_eager), and the
    compiled step still matches the unsharded model."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = build("llama", tied=True)
    kwargs = dict(tp_size=2) if mode == "split_gather" else dict(sp_size=2)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(sp_mode=mode, **kwargs))
    compiled = torch.compile(model, backend="aot_eager")
    ids, labels = batch(2, seq=11)
    loss = compiled(input_ids=ids, labels=labels).loss
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    breaks = sum(counters["graph_break"].values())
    assert breaks == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, counters["stats"]["unique_graphs"]
    assert rel_err(loss.detach(), ref_loss.detach()) <= 1e-5
    for name, err in grad_errors(model, ref).items():  # complete once the reducer ran
        assert err <= 1e-5, name
    return breaks


@pytest.mark.parametrize("mode", ["split_gather", "all_to_all", "ring"])
def test_compile_sequence_parallel_without_graph_breaks(pools, mode):
    assert pools(2).run(check_compiled_sequence_parallel, mode) == [0, 0]
