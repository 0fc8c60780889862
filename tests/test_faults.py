"""Faults found by adversarial use of the tp core, each reproduced here as a test:
gradient accumulation with replicated KV heads, a failure on one rank inside a collective entry
point (must raise everywhere, not hang), tp peers fed different batches, `output_attentions`,
`forward_backward` without a loss. Timeouts bound every multi-rank check, so a hang fails fast.
"""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import shardformer as sf

from .models import batch, build, grad_errors, rel_err

TOL = 1e-5
BOUND = 90  # seconds: a rank that hangs makes the test fail with TimeoutError instead


# ------------------------------------------------------------------ 1. accumulation, DDP semantics
def check_accumulation(tp, kv_heads):
    """3 backward passes per step, 2 steps; passes 1-2 under no_sync() or not; zero_grad() between
    the steps or not. The gathered gradients equal the unsharded model's after every step."""
    ref0 = build("llama", tied=True, num_key_value_heads=kv_heads)
    results = {}
    for use_no_sync in (False, True):
        for zero_between in (False, True):
            ref = copy.deepcopy(ref0)
            model = sf.shard_model(copy.deepcopy(ref0), config=sf.ShardConfig(tp_size=tp))
            dp, dp_rank = model.sf_mesh["dp"].size(), model.sf_mesh.get_local_rank("dp")
            for step in range(2):
                for micro in range(3):
                    ids, labels = batch(2 * dp, seed=10 * step + micro + 1)
                    ref_loss = sum(ref(input_ids=ids[2 * d:2 * d + 2], labels=labels[2 * d:2 * d + 2]).loss
                                   for d in range(dp)) / dp
                    ref_loss.backward()
                    mine = slice(2 * dp_rank, 2 * dp_rank + 2)
                    if use_no_sync and micro < 2:
                        with model.no_sync():
                            model(input_ids=ids[mine], labels=labels[mine]).loss.backward()
                    else:
                        model(input_ids=ids[mine], labels=labels[mine]).loss.backward()
                bad = {n: e for n, e in grad_errors(model, ref).items() if not e <= TOL}
                assert not bad, (use_no_sync, zero_between, step, bad)
                if zero_between:
                    model.zero_grad(), ref.zero_grad()
            results[(use_no_sync, zero_between)] = True
    return len(results)


@pytest.mark.parametrize("world,tp,kv_heads", [(2, 2, 1), (2, 2, 2), (4, 4, 1), (4, 4, 2), (4, 2, 1), (4, 2, 2)])
def test_accumulation_equals_unsharded(pools, world, tp, kv_heads):
    """tp in {2, 4} over 1 and 2 KV heads (replicated when tp exceeds them), and dp2 x tp2."""
    assert pools(world).run(check_accumulation, tp, kv_heads, timeout=BOUND * 2) == [4] * world


# ------------------------------------------------------------------ 2/3. a failure on one rank
def _raises_everywhere(fn, *args):
    """Run fn on every rank; return (exception type name, message) per rank, or None if it passed."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - the test inspects what each rank raised
        return type(err).__name__, str(err)
    return None


def check_save_failure(good_dir):
    """Rank 0 cannot write (a path under a file): every rank raises, and training goes on."""
    model = sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=dist.get_world_size()))
    blocker = os.path.join(good_dir, "a_file")
    if dist.get_rank() == 0:
        open(blocker, "w").close()
    dist.barrier()
    path = os.path.join(blocker, "out") if dist.get_rank() == 0 else os.path.join(good_dir, "unused")
    outcome = _raises_everywhere(sf.save_pretrained, model, path)
    ids, labels = batch(2)
    loss = model.forward_backward(input_ids=ids, labels=labels)  # the ranks are still in step
    sf.save_pretrained(model, os.path.join(good_dir, "ok"))
    return outcome, float(loss)


def test_save_failure_on_one_rank_raises_everywhere(pools):
    with tempfile.TemporaryDirectory() as d:
        outcomes = pools(2).run(check_save_failure, d, timeout=BOUND)
        assert os.path.exists(os.path.join(d, "ok", "config.json"))
    (kind0, msg0), loss0 = outcomes[0]
    (kind1, msg1), loss1 = outcomes[1]
    assert kind0 in ("NotADirectoryError", "FileExistsError"), kind0
    assert kind1 == "RuntimeError" and "rank 0" in msg1 and kind0 in msg1, msg1
    assert loss0 == loss1


def check_failed_save_keeps_the_earlier_one(directory):
    """A save into a directory holding an earlier save (in several files) that fails part-way on the
    writer (its second file cannot be written) raises on every rank, leaves the earlier save
    loadable and unchanged and no temporary file; a later save as one file replaces them all."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    model = sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=dist.get_world_size()))
    sf.save_pretrained(model, directory, max_shard_size=40_000)
    before = sorted(os.listdir(directory))
    first = {k: v.clone() for k, v in sf.full_state_dict(model).items()}
    ids, labels = batch(2)
    model.forward_backward(input_ids=ids, labels=labels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the next save differs from the first
    original, calls = safetensors.torch.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (injected)")
        return original(*args, **kwargs)

    safetensors.torch.save_file = failing
    try:
        outcome = _raises_everywhere(sf.save_pretrained, model, directory, 40_000)
    finally:
        safetensors.torch.save_file = original
    dist.barrier()
    after = sorted(os.listdir(directory))
    loaded = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    same = all(torch.equal(loaded[k], v) for k, v in first.items())
    sf.save_pretrained(model, directory)
    dist.barrier()
    final = sorted(os.listdir(directory))
    again = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    now = sf.full_state_dict(model)
    return outcome, before, after, same, final, all(torch.equal(again[k], v) for k, v in now.items())


def test_failed_save_keeps_the_earlier_one(pools, tmp_path):
    results = pools(2).run(check_failed_save_keeps_the_earlier_one, str(tmp_path / "out"), timeout=BOUND)
    for rank, (outcome, before, after, same, final, saved) in enumerate(results):
        assert outcome is not None and "No space left on device (injected)" in outcome[1], (rank, outcome)
        assert len([f for f in before if f.endswith(".safetensors")]) > 2, before
        assert after == before and same, (after, before)  # nothing half-written, nothing removed
        assert [f for f in final if f.startswith("model")] == ["model.safetensors"] and saved, final


def check_shard_model_failure(where):
    """One rank fails inside shard_model: in planning (its model cannot split) or while applying."""
    rank = dist.get_rank()
    model = build("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48) \
        if where == "plan" and rank == 1 else build("llama")
    if where == "apply" and rank == 1:
        import shardformer.api as api
        original = api.apply_tensor_parallel

        def broken(*args, **kwargs):
            raise RuntimeError("injected failure while applying")

        api.apply_tensor_parallel = broken
    try:
        return _raises_everywhere(sf.shard_model, model, None, sf.ShardConfig(tp_size=2))
    finally:
        if where == "apply" and rank == 1:
            api.apply_tensor_parallel = original


def check_forward_backward_failure(tp, injection, check=True):
    """One rank's batch is bad (labels missing / out of range) while the others' is fine; with
    check_batch=False the ranks still share the validation."""
    config = sf.ShardConfig(tp_size=tp) if check else sf.ShardConfig(tp_size=tp, check_batch=False)
    model = sf.shard_model(build("llama"), config=config)
    ids, labels = batch(2)
    if dist.get_rank() == 1:
        labels = None if injection == "no_labels" else labels.masked_fill(labels == labels[0, 0], 250)
    outcome = _raises_everywhere(lambda: model.forward_backward(input_ids=ids, labels=labels))
    ids, labels = batch(2)
    model.forward_backward(input_ids=ids, labels=labels)  # still in step afterwards
    return outcome


def check_clip_failure(tp):
    """Rank 1 passes an invalid max_norm: every rank raises (at tp=1 the other rank is another
    data-parallel replica)."""
    model = sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=tp))
    ids, labels = batch(2)
    model.forward_backward(input_ids=ids, labels=labels)
    outcome = _raises_everywhere(model.clip_grad_norm_, -1.0 if dist.get_rank() == 1 else 1.0)
    norm = model.clip_grad_norm_(1.0)  # still in step afterwards
    return outcome, float(norm)


@pytest.mark.parametrize("where", ["plan", "apply"])
def test_shard_model_failure_on_one_rank_raises_everywhere(pools, where):
    outcomes = pools(2).run(check_shard_model_failure, where, timeout=BOUND)
    assert all(o is not None for o in outcomes), outcomes
    if where == "plan":
        assert outcomes[1][0] == "ValueError" and "num_key_value_heads=3" in outcomes[1][1]
        assert outcomes[0][0] == "ValueError" and "rank 1" in outcomes[0][1] and "num_key_value_heads=3" in outcomes[0][1]
    else:
        assert outcomes[1] == ("RuntimeError", "injected failure while applying")
        assert outcomes[0][0] == "RuntimeError" and "rank 1" in outcomes[0][1] and "injected" in outcomes[0][1]


@pytest.mark.parametrize("tp,injection,check", [(1, "no_labels", True), (1, "out_of_range", True),
                                               (2, "no_labels", True), (1, "no_labels", False),
                                               (1, "out_of_range", False)])
def test_forward_backward_failure_on_one_rank_raises_everywhere(pools, tp, injection, check):
    """tp=1 on 2 ranks is dp=2: the bad batch is on another replica, which would otherwise leave
    the good one waiting in the gradient all-reduce."""
    outcomes = pools(2).run(check_forward_backward_failure, tp, injection, check, timeout=BOUND)
    assert all(o is not None and o[0] == "ValueError" for o in outcomes), outcomes
    assert all(("labels" in o[1]) for o in outcomes), outcomes


@pytest.mark.parametrize("tp", [1, 2])
def test_clip_grad_norm_failure_on_one_rank_raises_everywhere(pools, tp):
    outcomes = pools(2).run(check_clip_failure, tp, timeout=BOUND)
    (o0, n0), (o1, n1) = outcomes
    assert o1[0] == "ValueError" and "max_norm" in o1[1]
    assert o0[0] == "ValueError" and "rank 1" in o0[1] and "max_norm" in o0[1]
    assert n0 == n1


# ------------------------------------------------------------------ 3. tp peers, different batches
def check_different_batches(check, layout=None):
    """Each tp (or sp) rank gets its own batch (as a per-rank seed would give): an error on every
    rank, naming the replica's ranks; the same token count in other shapes too. check_batch=False
    skips the check (the caller vouches for its data)."""
    layout = layout or dict(tp_size=2)
    config = sf.ShardConfig(**layout) if check else sf.ShardConfig(tp_size=2, check_batch=False)
    model = sf.shard_model(build("llama"), config=config)
    rank = dist.get_rank()
    ids, labels = batch(2, seed=rank + 1)
    if not check:
        model.forward_backward(input_ids=ids, labels=labels)
        return None
    outcomes = [_raises_everywhere(lambda: model.forward_backward(input_ids=ids, labels=labels)),
                _raises_everywhere(lambda: model(input_ids=ids, labels=labels))]
    same_ids, _ = batch(2)
    reshaped = same_ids.reshape(4, 6) if rank else same_ids
    outcomes.append(_raises_everywhere(lambda: model(input_ids=reshaped)))
    if "sp_mode" not in layout:  # Ulysses refuses generate anyway
        model.eval()
        outcomes.append(_raises_everywhere(lambda: model.generate(ids[:, :4], max_new_tokens=2, do_sample=False)))
    return outcomes


def test_tp_peers_with_different_batches_raise(pools):
    for outcomes in pools(2).run(check_different_batches, True, timeout=BOUND):
        assert None not in outcomes, outcomes
        for kind, message in outcomes:
            assert kind == "ValueError" and "same batch" in message and "[0, 1]" in message, message
    assert pools(2).run(check_different_batches, False, timeout=BOUND) == [None, None]


def test_sp_peers_with_different_sequences_raise(pools):
    """The ranks of one sequence-parallel group (all_to_all) with different sequences: detected,
    not hung on."""
    for outcomes in pools(2).run(check_different_batches, True, dict(sp_size=2, sp_mode="all_to_all"),
                                 timeout=BOUND):
        assert None not in outcomes, outcomes
        for kind, message in outcomes:
            assert kind == "ValueError" and "same batch" in message, message


# ------------------------------------------------------------------ 4. output_attentions
def check_attentions(tp):
    ref = build("llama", attn_implementation="eager")
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=tp))
    ids, labels = batch(2, seq=9)
    want = ref(input_ids=ids, output_attentions=True).attentions
    for kwargs in ({}, {"labels": labels}, {"return_dict": False}):
        out = model(input_ids=ids, output_attentions=True, **kwargs)
        got = out[-1] if isinstance(out, tuple) else out.attentions
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape == (2, 8, 9, 9), (g.shape, w.shape)
            assert rel_err(g, w) <= TOL
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_output_attentions_have_every_head(pools, tp):
    pools(tp).run(check_attentions, tp, timeout=BOUND)


# ------------------------------------------------------------------ 5. forward_backward without a loss
def check_no_loss():
    ids, _ = batch(2)
    messages = []
    for family, kwargs in (("llama-model", {"input_ids": ids}), ("llama", {"input_ids": ids, "return_dict": False}),
                           ("llama", {"input_ids": ids}), ("llama-seqcls", {"input_ids": ids})):
        model = sf.shard_model(build(family), config=sf.ShardConfig(tp_size=2))
        with pytest.raises(ValueError, match="labels") as info:
            model.forward_backward(**kwargs)
        messages.append(str(info.value))
    return messages


def test_forward_backward_without_loss_names_labels(pools):
    messages = pools(2).run(check_no_loss, timeout=BOUND)[0]
    assert "LlamaModel.forward takes no labels" in messages[0]
    assert all("without labels" in m for m in messages[1:]), messages
