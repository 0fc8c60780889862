"""The oracle: every tensor-parallel (x data-parallel) layout reproduces the unsharded model.

fp32 on CPU, relative error max|a-b| / max|b| <= 1e-5 for the loss, every parameter's gradient
(gathered from the shards) and every weight after one AdamW step.
"""
import copy

import pytest
import torch
import torch.distributed as dist

import shardformer as sf
from shardformer.kernels import FusedRMSNorm, FusedSwiGLUMLP, cuda
from shardformer.sharding import sharded_parameters

from . import standin_ext
from .models import batch, build, capture_logs, grad_errors, masked_step_errors, rel_err

TOL = 1e-5
# AdamW's first step is about lr * sign(g): with the default eps=1e-8 a gradient entry near 1e-8
# flips by fp32 rounding noise alone (seen: -9.42e-08 vs -9.99e-08, a 3e-7 relative gradient
# difference, moved a weight by 7e-5 relative even at tp=1). eps=1e-4 keeps the update Lipschitz
# at that noise level (|d update| <= lr * |dg| / eps), so the comparison tests the sharding, not
# Adam's conditioning. The tolerance itself stays 1e-5.
ADAMW = dict(lr=1e-3, eps=1e-4)


def _loss(model, family, ids, labels):
    if family == "llama-model":
        # a fixed random projection: mean(h**2) of RMS-normed h is ~constant and its gradient ~0
        hidden = model(input_ids=ids).last_hidden_state
        probe = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(7))
        return (hidden * probe).mean()
    if family.endswith("-seqcls"):
        return model(input_ids=ids, labels=ids[:, 0] % 2).loss
    return model(input_ids=ids, labels=labels).loss


def check_equivalence(family, tp, tied=False, steps=1, gradient_checkpointing=False, rows_per_rank=2,
                      fused=True, sp_mode=None, seq=12, sp=1, **overrides):
    """On every rank: shard a copy of the reference, run fwd+bwd (+AdamW) on this dp rank's rows,
    compare with the reference run on all rows. Returns the worst relative error."""
    ref = build(family, tied=tied, **overrides)
    cfg = sf.ShardConfig(tp_size=tp, gradient_checkpointing=gradient_checkpointing, enable_fused_kernels=fused,
                         sp_mode=sp_mode, sp_size=sp)
    model = sf.shard_model(copy.deepcopy(ref), config=cfg)
    policy, layers = model.sf_policy, model.base_model.get_submodule(model.sf_policy.layers)
    substituted = fused and cuda.available()  # without the extension HF's modules stay (issue 13)
    if policy.fused_mlp:
        assert isinstance(layers[0].get_submodule(policy.fused_mlp), FusedSwiGLUMLP) == substituted
    for name in policy.fused_norms:
        assert isinstance(layers[0].get_submodule(name), FusedRMSNorm) == substituted
    if policy.final_norm:
        final = model.base_model.get_submodule(policy.final_norm)
        assert isinstance(final, FusedRMSNorm) == (substituted and policy.fused_final_norm)
    model.train(), ref.train()
    mesh = model.sf_mesh
    chunks = []  # the sequence length each decoder layer outputs: a chunk under sequence parallelism
    layers[-1].register_forward_hook(lambda m, a, out: chunks.append(
        (out[0] if isinstance(out, tuple) else out).shape[1]))
    dp, dp_rank = mesh["dp"].size(), mesh.get_local_rank("dp")
    mine = slice(rows_per_rank * dp_rank, rows_per_rank * (dp_rank + 1))
    ref_opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    errs = {}
    for step in range(steps):
        ids, labels = batch(rows_per_rank * dp, seq=seq, seed=step + 1, vocab=ref.config.vocab_size)
        ref_loss = _loss(ref, family, ids, labels)
        ref_loss.backward()
        if family in ("llama-model",):
            loss = _loss(model, family, ids[mine], labels[mine])
            loss.backward()
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=mesh.get_group("dp"))
            loss /= dp
        else:
            loss = model.forward_backward(input_ids=ids[mine], labels=labels[mine]) if not family.endswith("-seqcls") \
                else model.forward_backward(input_ids=ids[mine], labels=ids[mine, 0] % 2)
        split = {"split_gather": tp, "all_to_all": sp, "ring": 2 * sp}.get(sp_mode, 1)
        per_rank = -(-seq // split) * (2 if sp_mode == "ring" else 1)  # ring: two zig-zag chunks
        assert chunks[-1] == per_rank, (chunks[-1], seq, split)  # the sequence really was split
        errs[f"step{step}/loss"] = rel_err(loss, ref_loss.detach())
        errs |= {f"step{step}/grad/{name}": err for name, err in grad_errors(model, ref).items()}
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
        full = sf.full_state_dict(model)
        for name, tensor in ref.state_dict().items():
            errs[f"step{step}/weight/{name}"] = rel_err(full[name], tensor)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"
    return max(errs.values())


CASES = [
    ("llama", True), ("llama", False), ("mistral", False), ("qwen2", True), ("qwen2", False),
]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,tied", CASES)
def test_tensor_parallel_matches_unsharded(pools, family, tied, tp):
    worst = pools(tp).run(check_equivalence, family, tp, tied)
    assert max(worst) <= TOL


@pytest.mark.parametrize("family", ["llama-model", "llama-seqcls"])
@pytest.mark.parametrize("tp", [2, 4])
def test_other_heads_match_unsharded(pools, family, tp):
    assert max(pools(tp).run(check_equivalence, family, tp)) <= TOL


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_data_parallel_times_tensor_parallel(pools, tp):
    """World of 4: dp = 4 / tp; gradients averaged over dp as DDP does, KV replicas summed."""
    assert max(pools(4).run(check_equivalence, "llama", tp, True, 2)) <= TOL


def test_gradient_checkpointing(pools):
    assert max(pools(2).run(check_equivalence, "llama", 2, False, 1, True)) <= TOL


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_without_fused_kernels(pools, tp):
    """enable_fused_kernels=False keeps HF's RMSNorm / MLP modules; the other tests run the fused
    modules (their exact PyTorch reference on CPU)."""
    assert max(pools(tp).run(check_equivalence, "llama", tp, False, 1, False, 2, False)) <= TOL


def check_logits_without_labels(tp, sp_mode=None):
    """Without labels the user gets full-vocabulary logits (no padding); with labels in eval mode
    the logits stay this rank's vocab slice; in training with fused kernels there are none."""
    ref = build("llama", tied=True)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=tp, sp_mode=sp_mode))
    ids, labels = batch(2)
    full = model(input_ids=ids).logits
    assert full.shape == (2, 12, 250), full.shape
    err = rel_err(full, ref(input_ids=ids).logits)
    assert err <= TOL, err
    head = model.lm_head
    train_out = model(input_ids=ids, labels=labels)
    assert train_out.logits is None and train_out[0] is train_out.loss  # fused linear + CE
    assert rel_err(train_out.loss, ref(input_ids=ids, labels=labels).loss) <= TOL
    model.eval(), ref.eval()
    local = model(input_ids=ids, labels=labels).logits
    assert local.shape[-1] == head.vocab_valid
    expect = ref(input_ids=ids).logits[..., head.vocab_start:head.vocab_start + head.vocab_valid]
    assert rel_err(local, expect) <= TOL
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1, :5], **greedy), ref.generate(ids[:1, :5], **greedy))
    if sp_mode is not None:  # the layers' hidden states are sequence chunks: refused, not returned
        with pytest.raises(ValueError, match="output_hidden_states"):
            model(input_ids=ids, output_hidden_states=True)
    return err


@pytest.mark.parametrize("sp_mode", [None, "split_gather"])
def test_logits(pools, sp_mode):
    """Also with the sequence split: generate's one-token steps are padded inside the split."""
    pools(4).run(check_logits_without_labels, 4, sp_mode)


def check_forward_paths(tp):
    """model.forward(...) (as wrappers like PEFT call it) and return_dict=False give the same
    full-vocabulary logits as model(...)."""
    ref = build("llama", tied=False)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=tp))
    ids, labels = batch(2)
    want = ref(input_ids=ids).logits
    assert rel_err(model.forward(input_ids=ids).logits, want) <= TOL
    assert rel_err(model(input_ids=ids, return_dict=False)[0], want) <= TOL
    out = model.forward(input_ids=ids, labels=labels)  # training + labels: the fused loss ran
    assert out.logits is None and rel_err(out.loss, ref(input_ids=ids, labels=labels).loss) <= TOL
    import inspect
    assert "labels" in inspect.signature(model.forward).parameters  # HF's signature is kept
    return True


def test_forward_paths(pools):
    pools(2).run(check_forward_paths, 2)


def check_one_input_all_reduce_per_block(tp):
    """Backward all-reduces of the tp input gradient: one per attention block and one per MLP
    block (at the norm outputs), not one per q/k/v/gate/up linear; plus one for the LM head."""
    from shardformer import comm

    model = sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=tp, enable_fused_kernels=False))
    calls, original = [], comm._CopyToGroup.apply
    comm._CopyToGroup.apply = staticmethod(lambda *a: (calls.append(1), original(*a))[1])
    try:
        ids, labels = batch(2)
        model(input_ids=ids, labels=labels).loss.backward()
    finally:
        comm._CopyToGroup.apply = original
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers + 1, len(calls)
    return len(calls)


def test_one_input_all_reduce_per_block(pools):
    pools(2).run(check_one_input_all_reduce_per_block, 2)


def test_vocab_slice_of_padding_only(pools):
    """vocab 5 over tp=4: slices of 2, the last rank holds padding only; every path still exact."""
    for fused in (False, True):
        pools(4).run(check_equivalence, "llama", 4, True, 1, False, 2, fused, vocab_size=5)


def check_loss_kwargs(tp, fused):
    """transformers' loss arguments keep their meaning: num_items_in_batch (sum / count),
    shift_labels (targets as given), in the fused and the unfused vocab-parallel loss."""
    ref = build("llama", tied=False)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=tp, enable_fused_kernels=fused))
    ids, labels = batch(2)
    shifted = torch.roll(labels, -1, dims=1)
    for extra in ({"num_items_in_batch": torch.tensor(7)}, {"shift_labels": shifted}, {}):
        got = model(input_ids=ids, labels=labels, **extra)
        want = ref(input_ids=ids, labels=labels, **extra)
        assert (got.logits is None) == fused
        assert rel_err(got.loss, want.loss) <= TOL, (extra.keys(), got.loss, want.loss)
        got.loss.backward()
        want.loss.backward()
    for name, err in grad_errors(model, ref).items():
        assert err <= TOL, name
    return True


@pytest.mark.parametrize("fused", [True, False])
def test_loss_arguments(pools, fused):
    pools(2).run(check_loss_kwargs, 2, fused)


def check_clip_and_accumulation(tp):
    """clip_grad_norm_ returns the unsharded model's norm and clips identically; gradient
    accumulation under no_sync() equals one backward over both micro-batches."""
    ref = build("llama", tied=True)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=tp))
    mesh = model.sf_mesh
    dp, dp_rank = mesh["dp"].size(), mesh.get_local_rank("dp")
    ids, labels = batch(4 * dp)
    # reference: mean over the two micro-batches of each dp rank's mean loss, over all dp ranks
    total = 0
    for d in range(dp):
        for half in (0, 1):
            rows = slice(4 * d + 2 * half, 4 * d + 2 * half + 2)
            total = total + ref(input_ids=ids[rows], labels=labels[rows]).loss / (2 * dp)
    total.backward()
    mine = [slice(4 * dp_rank + 2 * h, 4 * dp_rank + 2 * h + 2) for h in (0, 1)]
    reducer = model.sf_grad_reducer
    before = dict(reducer.launches)
    with model.no_sync():
        (model(input_ids=ids[mine[0]], labels=labels[mine[0]]).loss / 2).backward()
    assert reducer.launches == before, (before, reducer.launches)  # no all-reduce inside no_sync
    (model(input_ids=ids[mine[1]], labels=labels[mine[1]]).loss / 2).backward()
    assert reducer.launches["during_backward"] == before["during_backward"] + len(reducer.buckets)
    for norm_type in (2.0, float("inf")):
        max_norm = 0.05
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type=norm_type)
        norm = model.clip_grad_norm_(max_norm, norm_type=norm_type)
        assert rel_err(norm, ref_norm) <= TOL, (norm_type, norm, ref_norm)
    for name, err in grad_errors(model, ref).items():
        assert err <= TOL, (name, err)
    return float(norm)


@pytest.mark.parametrize("tp", [2, 4])
def test_clip_grad_norm_and_no_sync(pools, tp):
    pools(4).run(check_clip_and_accumulation, tp)


def check_bf16(tp, fused):
    """A bf16 model (torch_dtype=bfloat16, no fp32 master weights) shards too. Tolerances, bf16
    only: bf16 keeps 8 significant bits (rounding error up to 2^-9 = 2e-3 relative per op); the
    sharded model rounds each rank's partial sums to bf16 before the tp all-reduce where the
    reference rounds the whole sum once, so gradients differ by a few roundings: 3e-2 relative
    (seen: 1.4e-2). The loss is accumulated in fp32 by both: 1e-3 (seen: 3e-5)."""
    ref = build("llama", tied=True).to(torch.bfloat16)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=tp, enable_fused_kernels=fused))
    ids, labels = batch(2)
    loss = model(input_ids=ids, labels=labels).loss
    ref_loss = ref(input_ids=ids, labels=labels).loss
    loss.backward()
    ref_loss.backward()
    assert rel_err(loss.detach().float(), ref_loss.detach().float()) <= 1e-3
    assert {p.dtype for _, p, _ in sharded_parameters(model)} == {torch.bfloat16}
    for name, err in grad_errors(model, ref).items():
        assert err <= 3e-2, (name, err)
    return True


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_model(pools, fused):
    pools(2).run(check_bf16, 2, fused)


def check_policy_built_at_run_time(tp):
    """A policy is a frozen dataclass instance: one built at run time (no class, no registry)
    shards exactly like the registered class, and dataclasses.replace changes one field."""
    import dataclasses

    from shardformer.policies import LlamaPolicy, Policy

    llama = LlamaPolicy()
    fields = {f.name: getattr(llama, f.name) for f in dataclasses.fields(llama) if f.name != "name"}
    runtime = Policy(name="RuntimeLlama", **fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.fused_mlp = None
    ref = build("llama")
    ids, labels = batch(2)
    ref(input_ids=ids, labels=labels).loss.backward()
    unfused_mlp = dataclasses.replace(llama, fused_mlp=None)
    with standin_ext.installed():  # an extension (the CPU stand-in), so the fused modules are substituted
        for policy in (runtime, unfused_mlp):
            model = sf.shard_model(copy.deepcopy(build("llama")), policy=policy, config=sf.ShardConfig(tp_size=tp))
            assert isinstance(model.model.layers[0].mlp, FusedSwiGLUMLP) == (policy is runtime)
            model.forward_backward(input_ids=ids, labels=labels)
            assert max(grad_errors(model, ref).values()) <= TOL
    return True


def test_policy_built_at_run_time(pools):
    pools(2).run(check_policy_built_at_run_time, 2)


@pytest.mark.parametrize("tp,seq,tied", [(2, 12, True), (2, 9, False), (4, 12, False), (4, 10, True)])
def test_split_gather_sequence_parallel(pools, tp, seq, tied):
    """sp_mode="split_gather" (Megatron sequence parallelism on the tp group): loss, every
    gradient and every weight after AdamW equal the unsharded model's; GQA (2 KV heads, so tp=4
    replicates them); sequence lengths that tp divides and that it does not (padded inside)."""
    assert max(pools(tp).run(check_equivalence, "llama", tp, tied, 2, False, 2, True, "split_gather", seq)) <= TOL


def test_split_gather_with_checkpointing_and_without_fused_kernels(pools):
    """split_gather with HF's gradient checkpointing (the layers re-run their split hooks), and
    with the unfused vocab-parallel loss on gathered logits."""
    assert max(pools(2).run(check_equivalence, "llama", 2, False, 1, True, 2, True, "split_gather", 11)) <= TOL
    assert max(pools(2).run(check_equivalence, "llama", 2, True, 1, False, 2, False, "split_gather", 11)) <= TOL


# (world, tp, sp, seq, tied): sp alone (2 and 4), with dp = 2, with tp = 2 (KV heads repeated: 2 KV
# heads over tp 2 leave one per rank, fewer than sp); lengths sp divides and does not
ULYSSES = [(2, 1, 2, 12, True), (4, 1, 4, 10, False), (4, 1, 2, 9, False), (4, 2, 2, 11, True)]


@pytest.mark.parametrize("world,tp,sp,seq,tied", ULYSSES)
def test_ulysses_sequence_parallel(pools, world, tp, sp, seq, tied):
    """sp_mode="all_to_all": loss, every gradient and every weight after AdamW equal the
    unsharded model's."""
    worst = pools(world).run(check_equivalence, "llama", tp, tied, 2, False, 2, True, "all_to_all", seq, sp)
    assert max(worst) <= TOL


def test_ulysses_with_checkpointing_other_heads_and_without_fused_kernels(pools):
    """all_to_all with HF's gradient checkpointing, with the unfused loss, and for a model without
    an LM head (LlamaModel: its output gathered along the sequence) and a classifier."""
    run = pools(2).run
    assert max(run(check_equivalence, "llama", 1, False, 1, True, 2, True, "all_to_all", 11, 2)) <= TOL
    assert max(run(check_equivalence, "llama", 1, True, 1, False, 2, False, "all_to_all", 11, 2)) <= TOL
    for family in ("llama-model", "llama-seqcls"):
        assert max(run(check_equivalence, family, 1, False, 1, False, 2, True, "all_to_all", 11, 2)) <= TOL


def check_ulysses_refuses_cache():
    model = sf.shard_model(build("llama"), config=sf.ShardConfig(sp_size=2, sp_mode="all_to_all"))
    ids, _ = batch(1)
    assert model(input_ids=ids).logits.shape == (1, 12, 250)  # whole logits without labels
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(ids[:, :4], max_new_tokens=2, do_sample=False)
    return True


def test_ulysses_refuses_generate(pools):
    pools(2).run(check_ulysses_refuses_cache)


def check_setup_log_line():
    """Rank 0 logs the layout at setup: mesh, substituted modules, attention path."""
    with capture_logs() as logs:
        sf.shard_model(build("llama"), config=sf.ShardConfig(sp_size=2, sp_mode="all_to_all"))
    return logs.messages


def test_setup_logs_the_layout(pools):
    first, second = pools(2).run(check_setup_log_line)
    assert second == [] and len(first) == 1, (first, second)
    line = first[0]
    for part in ("pp 1 x dp 1 x sp 2 x tp 1", "sequence parallel all_to_all", "ColumnParallelLinear",
                 "attention sf_ulysses_sdpa"):
        assert part in line, (part, line)


def check_padding_mask(config_kwargs):
    """A right-padded batch (attention_mask zeros, labels -100 there) gives the unsharded loss and
    gradients under sequence parallelism too."""
    ref = build("llama")
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(**config_kwargs))
    ids, labels = batch(2, seq=11)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    labels = labels.masked_fill(mask == 0, -100)
    loss = model.forward_backward(input_ids=ids, attention_mask=mask, labels=labels)
    ref_loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_loss.backward()
    assert rel_err(loss, ref_loss.detach()) <= TOL
    bad = {n: e for n, e in grad_errors(model, ref).items() if not e <= TOL}
    assert not bad, bad
    return True


@pytest.mark.parametrize("config_kwargs", [dict(tp_size=2, sp_mode="split_gather"),
                                           dict(sp_size=2, sp_mode="all_to_all")])
def test_sequence_parallel_with_padding_mask(pools, config_kwargs):
    pools(2).run(check_padding_mask, config_kwargs)


def check_ulysses_models_side_by_side():
    """Two Ulysses models of different layouts in one process (dp2 x sp2 and sp2 x tp2: other sp
    groups), and an unsharded model sharing the first one's config: each keeps its own groups and
    attention; the unsharded one stays HF's."""
    ref = build("llama", tied=True)
    twin = type(ref)(ref.config).float()  # built from the same config object
    twin.load_state_dict(ref.state_dict())
    a = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(sp_size=2, sp_mode="all_to_all"))
    assert twin.config._attn_implementation == "sdpa" and a.config is not twin.config
    dp_rank = a.sf_mesh.get_local_rank("dp")
    ids, labels = batch(4, seq=11)
    mine = slice(2 * dp_rank, 2 * dp_rank + 2)
    a.eval(), ref.eval(), twin.eval()
    before = a(input_ids=ids[mine], labels=labels[mine]).loss
    b = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(sp_size=2, tp_size=2, sp_mode="all_to_all"))
    b.eval()
    after = a(input_ids=ids[mine], labels=labels[mine]).loss
    want = ref(input_ids=ids[mine], labels=labels[mine]).loss
    assert rel_err(before, want) <= TOL and rel_err(after, want) <= TOL, (before, after, want)
    assert rel_err(b(input_ids=ids[:2], labels=labels[:2]).loss, ref(input_ids=ids[:2], labels=labels[:2]).loss) <= TOL
    assert rel_err(twin(input_ids=ids[mine]).logits, ref(input_ids=ids[mine]).logits) <= TOL
    for model in (a, b):
        model.config.output_hidden_states = True  # the config's switch is refused like the argument
        with pytest.raises(ValueError, match="output_hidden_states"):
            model(input_ids=ids[:2])
    return True


def test_ulysses_models_side_by_side(pools):
    pools(4).run(check_ulysses_models_side_by_side)


# (world, sp, seq, tied): sp 2 and 4 alone, sp 2 with dp 2; lengths 2 x sp divides and does not
RING = [(2, 2, 12, True), (4, 4, 16, False), (4, 4, 10, True), (4, 2, 9, False)]


@pytest.mark.parametrize("world,sp,seq,tied", RING)
def test_ring_attention(pools, world, sp, seq, tied):
    """sp_mode="ring" (causal, zig-zag chunks, K/V passed around the ring, log-sum-exp merge):
    loss, every gradient and every weight after AdamW equal the unsharded model's."""
    worst = pools(world).run(check_equivalence, "llama", 1, tied, 2, False, 2, True, "ring", seq, sp)
    assert max(worst) <= TOL


RING_PADDING = "sp_mode='ring' supports a padding mask only as right padding"


def check_ring_refuses_padding():
    """dp 2 x sp 2: only the second dp replica's batch has padding the ring cannot take (right
    padding whose labels the loss does not ignore). forward_backward raises the ValueError on
    every rank (the others name the padded ranks), before any collective of the model: no rank
    goes on into the ring or the gradient reduction, so nothing hangs."""
    model = sf.shard_model(build("llama"), config=sf.ShardConfig(sp_size=2, sp_mode="ring"))
    padded_replica = torch.distributed.get_rank() >= 2
    ids, labels = batch(2, seq=11, seed=int(padded_replica))
    mask = torch.ones_like(ids)
    if padded_replica:
        mask[0, -3:] = 0
    with pytest.raises(ValueError, match=RING_PADDING) as raised:
        model.forward_backward(input_ids=ids, attention_mask=mask, labels=labels)
    if not padded_replica:
        assert "rank 2" in str(raised.value) and "rank 3" in str(raised.value), raised.value
    else:
        assert "where the targets are not the ignore index (-100)" in str(raised.value), raised.value
    assert all(p.grad is None for p in model.parameters())  # no backward ran anywhere
    if padded_replica:
        with pytest.raises(ValueError, match=RING_PADDING):  # the plain call: before its batch check
            model(input_ids=ids, attention_mask=mask, labels=labels)
    model.forward_backward(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)  # all ones: fine
    return True


def check_ring_right_padding():
    """sp 2 ring with right padding whose labels are -100 (rows of 11 tokens, 0, 4 and 9 padded,
    the last across the chunk boundaries): loss, every gradient and the eval loss equal the
    unsharded model's with the mask. Left padding, and a padded call without labels, are refused."""
    ref = build("llama")
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(sp_size=2, sp_mode="ring"))
    ids, labels = batch(3, seq=11, seed=5)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    mask[2, 2:] = 0
    labels = labels.masked_fill(mask == 0, -100)
    errs, ref_loss = masked_step_errors(model, ref, ids, mask, labels)
    with torch.no_grad():
        errs.append(rel_err(model.forward_loss(input_ids=ids, attention_mask=mask, labels=labels), ref_loss))
        errs.append(rel_err(model(input_ids=ids, attention_mask=mask, labels=labels).loss, ref_loss))
    model.zero_grad()
    for bad, why in ((mask.flip(1), "has a zero before a one"), (None, "computes no LM loss")):
        with pytest.raises(ValueError, match=RING_PADDING) as raised:
            if bad is None:
                model(input_ids=ids, attention_mask=mask)
            else:
                model.forward_backward(input_ids=ids, attention_mask=bad, labels=labels.flip(1))
        assert why in str(raised.value), raised.value
    return max(errs)


def test_ring_with_checkpointing_other_heads_and_padding_refused(pools):
    """ring with HF's gradient checkpointing and the unfused loss, for a model without an LM head
    and a classifier; a padding mask it cannot take is refused with a clear error."""
    run = pools(2).run
    assert max(run(check_equivalence, "llama", 1, False, 1, True, 2, True, "ring", 11, 2)) <= TOL
    assert max(run(check_equivalence, "llama", 1, True, 1, False, 2, False, "ring", 11, 2)) <= TOL
    for family in ("llama-model", "llama-seqcls"):
        assert max(run(check_equivalence, family, 1, False, 1, False, 2, True, "ring", 11, 2)) <= TOL
    assert pools(4).run(check_ring_refuses_padding) == [True] * 4


def test_ring_takes_right_padding(pools):
    assert max(pools(2).run(check_ring_right_padding)) <= TOL
