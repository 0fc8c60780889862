"""Pipeline parallelism composed with the sp-axis sequence modes (all_to_all, ring): pp 2 x sp 2 on 4
ranks reproduces the unsharded model (fp32, 1e-5 relative): the loss (labels with -100 entries),
every gradient with clipping active, every weight after AdamW steps, the evaluation loss. Stages
pass each other their sequence chunks; a later stage builds positions and masks for the whole
sequence (a sliding window, a padding mask); gradient checkpointing, ZeRO-2, checkpoints, `sf.split_batch`.
What stays refused is a ValueError at setup. (pp 2 x sp 2 x tp 2 needs 8 ranks: checked by hand, not here.)"""
import copy

import pytest
import torch

import shardformer as sf

from .models import batch, build, grad_errors, masked_step_errors, rel_err
from .test_equivalence import TOL
from .test_pipeline import check_pipeline


@pytest.mark.parametrize("zigzag", [False, True])
def test_take_and_place(zigzag):
    """`SequenceChunks`: the ranks' chunks partition the positions (placed back they add up to the
    sequence); each is `length(S)` long, in storage of its own; `take` undoes `place`, and
    `place`'s backward is `take` (local ops, no process group)."""
    from shardformer.sequence_parallel import SequenceChunks

    for sp in (2, 3, 4):
        for full in (1, 5, 11, 12, 16):
            x = torch.randn(2, full, 3)
            ranks = [SequenceChunks(sp, r, zigzag) for r in range(sp)]
            assert torch.equal(sum(c.place(c.take(x), full) for c in ranks), x), (sp, full)
            for c in ranks:
                part = c.take(x).requires_grad_()
                assert part.shape[1] == c.length(full) and part.untyped_storage().data_ptr() != \
                    x.untyped_storage().data_ptr()
                placed = c.place(part, full)
                assert torch.equal(c.take(placed), part)
                grad = torch.randn_like(placed)
                placed.backward(grad)
                assert torch.equal(part.grad, c.take(grad)), (sp, full, c.rank)


def check_chunks_between_stages(mode, seq):
    """(the sequence length of the hidden states a stage passes on, the attention implementation)."""
    model = sf.shard_model(build("llama", num_hidden_layers=4),
                           config=sf.ShardConfig(pp_size=2, sp_size=2, sp_mode=mode, num_microbatches=2))
    return model.sf_pipeline._hidden(1, seq, False).shape[1], model.config._attn_implementation


@pytest.mark.parametrize("mode,seq,length", [("all_to_all", 11, 6), ("ring", 11, 6), ("ring", 12, 6)])
def test_stages_pass_sequence_chunks(pools, mode, seq, length):
    """Stages pass this rank's chunk (ring: two of 2 sp, a multiple of 2 sp in all), not the sequence."""
    for passed, attention in pools(4).run(check_chunks_between_stages, mode, seq):
        assert passed == length and attention.startswith("sf_"), (passed, attention)


# (sp_mode, schedule, microbatches, tied, sequence length, family)
CASES = [
    ("all_to_all", "1f1b", 4, False, 12, "llama"),
    ("ring", "1f1b", 4, True, 12, "llama"),
    ("all_to_all", "gpipe", 2, True, 11, "llama"),  # a length the split does not divide
    ("ring", "interleaved", 4, False, 11, "llama"),
    ("all_to_all", "zbv", 4, True, 12, "llama"),
    ("all_to_all", "1f1b", 4, False, 12, "olmo3"),  # sliding-window layers: the whole sequence's mask
    ("ring", "1f1b", 4, True, 11, "qwen3"),  # q / k norms
]


@pytest.mark.parametrize("mode,schedule,microbatches,tied,seq,family", CASES)
def test_sp_axis_pipeline_matches_unsharded(pools, mode, schedule, microbatches, tied, seq, family):
    """pp 2 x sp 2: two AdamW steps with clipping, against the unsharded model."""
    worst = pools(4).run(check_pipeline, 2, schedule, microbatches, tied, 1, 4, 4, 2, seq, None, None, False, mode,
                         family, 2)
    assert max(worst) <= TOL


@pytest.mark.parametrize("mode", ["all_to_all", "ring"])
def test_sp_axis_pipeline_with_gradient_checkpointing(pools, mode):
    """The stage's first layer takes its chunk inside the recomputed region too."""
    worst = pools(4).run(check_pipeline, 2, "1f1b", 2, True, 1, 4, 4, 1, 12, None, None, True, mode, "llama", 2)
    assert max(worst) <= TOL


def test_sp_axis_pipeline_with_zero(pools):
    """ZeRO-2 (master weights, AdamW state and gradients sharded over dp x sp = sp here) with
    all_to_all x pp: the same weights as AdamW on the unsharded model."""
    from .test_zero import check_zero

    assert max(pools(4).run(check_zero, 2, sp=2, sp_mode="all_to_all", pp=2, steps=2)) <= TOL


def test_sp_axis_pipeline_checkpoint(pools, tmp_path):
    """The checkpoint of a pp 2 x sp 2 ring model loads with plain from_pretrained."""
    worst = pools(4).run(check_pipeline, 2, "1f1b", 2, True, 1, 4, 4, 1, 12, str(tmp_path / "ckpt"), None, False,
                         "ring", "llama", 2)
    assert max(worst) <= TOL


def check_padded_and_split_batches():
    """all_to_all x pp with an attention mask whose zeros real tokens after them must not see
    (labels -100 there): the later stage's mask is the whole sequence's; then the same batch
    passed as sf.split_batch shards."""
    ref = build("llama", num_hidden_layers=4)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(pp_size=2, sp_size=2, sp_mode="all_to_all",
                                                                     num_microbatches=2))
    ids, labels = batch(4, seq=11, seed=3)
    mask = torch.ones_like(ids)
    mask[0, 5] = 0
    mask[2, 2:4] = 0
    labels = labels.masked_fill(mask == 0, -100)
    errs, ref_loss = masked_step_errors(model, ref, ids, mask, labels)
    model.zero_grad()
    shard = sf.split_batch(dict(input_ids=ids, attention_mask=mask, labels=labels), model)
    errs.append(rel_err(model.forward_backward(**shard), ref_loss))
    errs += list(grad_errors(model, ref).values())
    with torch.no_grad():
        errs.append(rel_err(model.forward_loss(input_ids=ids, attention_mask=mask, labels=labels), ref_loss))
    return max(errs)


def test_padding_mask_and_split_batch(pools):
    assert max(pools(4).run(check_padded_and_split_batches)) <= TOL


def check_ring_padding():
    """ring x pp: right padding whose labels are -100 trains like the unsharded model with the mask
    (rows of 11 tokens, 3 and 7 padded); inner padding is refused on every rank before any stage
    runs."""
    ref = build("llama", num_hidden_layers=4)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(pp_size=2, sp_size=2, sp_mode="ring",
                                                                     num_microbatches=2))
    ids, labels = batch(4, seq=11, seed=4)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, 4:] = 0
    labels = labels.masked_fill(mask == 0, -100)
    errs, ref_loss = masked_step_errors(model, ref, ids, mask, labels)
    model.zero_grad()
    inner = mask.clone()
    inner[0, 5] = 0
    with pytest.raises(ValueError, match="sp_mode='ring' supports a padding mask only as right padding"):
        model.forward_backward(input_ids=ids, attention_mask=inner, labels=labels.masked_fill(inner == 0, -100))
    assert all(p.grad is None for p in model.parameters())
    return max(errs)


def test_ring_pipeline_padding(pools):
    assert max(pools(4).run(check_ring_padding)) <= TOL


def _setup_error(model, **config) -> str:
    """plan_layout's ValueError (no process group: everything is checked before any collective)."""
    from shardformer.plan import plan_layout

    with pytest.raises(ValueError) as raised:
        plan_layout(model, sf.policies.get_policy(model), sf.ShardConfig(**config), 4)
    return str(raised.value)


@pytest.mark.parametrize("mode", ["all_to_all", "ring"])
def test_still_refused_at_setup(mode):
    """Mixtral's router aux loss (every layer's router output over every token) and ring with a
    sliding window stay refused with pipelines, naming the config fields."""
    layout = dict(pp_size=2, sp_size=2, sp_mode=mode)
    msg = _setup_error(build("mixtral", num_hidden_layers=4, output_router_logits=True), **layout)
    assert "ShardConfig.pp_size=2" in msg and "output_router_logits=True" in msg, msg
    if mode == "ring":
        msg = _setup_error(build("mistral", num_hidden_layers=4, sliding_window=8), **layout)
        assert "ShardConfig.sp_mode='ring'" in msg and "sliding_window=8" in msg, msg


def test_planner_accepts_pipeline_with_sp_axis():
    """The memory planner shards pp 2 x sp 2 layouts (4 ranks): the weights are those of pp 2 on
    2 ranks (replicated over sp), the activations half of them (each rank holds half the sequence)."""
    from shardformer.planner import hf_config_of, stage_memory

    config = hf_config_of("tiny")
    config.pad_token_id = 0
    plain = stage_memory(config, sf.ShardConfig(pp_size=2, zero_stage=1), 2, batch=4, seq=64)
    for mode in ("all_to_all", "ring"):
        split = stage_memory(config, sf.ShardConfig(pp_size=2, sp_size=2, sp_mode=mode, zero_stage=1), 4, batch=4,
                             seq=64)
        assert [s.parameters for s in split] == [s.parameters for s in plain], (split, plain)
        assert all(2 * s.activations == p.activations for s, p in zip(split, plain)), (split, plain)
