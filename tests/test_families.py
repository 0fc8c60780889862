"""Families beyond LLaMA / Mistral / Qwen2, each against the unsharded model (loss, every
gradient, every weight after AdamW; fp32, 1e-5 relative): tensor parallelism (also with KV heads
replicated), and the sequence and pipeline parallelism the family supports."""
import pytest

from .test_equivalence import TOL, check_equivalence
from .test_pipeline import check_pipeline

# The sequence-parallel modes each family supports (the others are refused at setup: see the
# refusal tests), and its (tied embeddings, rows per rank) in those runs. Gemma runs two rows of
# 11 tokens: with one row its fp32 rounding (the weights after AdamW) came within 1e-5 by a thin
# margin (9.9e-6 for Gemma 3 split_gather; 1e-6 in fp64), with two 5e-6.
SEQUENCE_MODES = {"qwen3": ("split_gather", "all_to_all", "ring"), "phi3": ("split_gather", "all_to_all", "ring"),
                  "gemma2": ("split_gather", "all_to_all"), "gemma3": ("split_gather", "all_to_all"),
                  "gpt2": ("split_gather",), "mixtral": ("all_to_all", "ring"),
                  "olmo2": ("split_gather", "all_to_all", "ring"), "olmo3": ("split_gather", "all_to_all"),
                  "olmoe": ("all_to_all", "ring")}
SEQUENCE_RUNS = {"qwen3": (False, 1), "phi3": (False, 1), "gemma2": (True, 2), "gemma3": (True, 2),
                 "gpt2": (True, 1), "mixtral": (False, 1), "olmo2": (False, 1), "olmo3": (True, 1),
                 "olmoe": (False, 1)}
# Families run over 2 pipeline stages (4 layers, 1F1B, 2 microbatches), with tied embeddings or not.
# GPT-2 and BERT refuse pipelines; Mixtral's are tested below (also with tp).
PIPELINES = {"qwen3": False, "phi3": False, "gemma2": True, "gemma3": True, "olmo2": False, "olmo3": True,
             "olmoe": False}


@pytest.mark.parametrize("family,sp_mode", [(f, m) for f, modes in SEQUENCE_MODES.items() for m in modes])
def test_sequence_parallel(pools, family, sp_mode):
    """split_gather at tp 2 on the tp group; all_to_all / ring at sp 2 on the sp axis; 11 tokens."""
    tp, sp = (2, 1) if sp_mode == "split_gather" else (1, 2)
    tied, rows = SEQUENCE_RUNS[family]
    worst = pools(2).run(check_equivalence, family, tp, tied, 1, False, rows, True, sp_mode, 11, sp)
    assert max(worst) <= TOL


@pytest.mark.parametrize("family", list(PIPELINES))
def test_pipeline(pools, family):
    assert max(pools(2).run(check_pipeline, 2, "1f1b", 2, PIPELINES[family], family=family)) <= TOL


@pytest.mark.parametrize("tp,tied", [(2, False), (2, True), (4, False)])
def test_qwen3_tensor_parallel(pools, tp, tied):
    """Qwen3's per-head q / k norms stay whole; their gradients are summed over tp (at tp 4 the
    two KV heads are replicated too)."""
    assert max(pools(tp).run(check_equivalence, "qwen3", tp, tied)) <= TOL


def check_packed_checkpoint(directory, family, tied):
    """A tp = 2 model with packed projections: `save_pretrained` gives plain HF tensors
    (`from_pretrained` equals the unsharded model), `load_pretrained` at tp = 2 reads them back
    into the same shards, and `init_model` gives bit-identical full weights at tp 1 and tp 2."""
    import copy

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import shardformer as sf

    from .models import batch, build, rel_err

    ref = build(family, tied=tied)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=2))
    sf.save_pretrained(model, directory)
    dist.barrier()
    errs = {}
    plain = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    errs |= {f"saved/{k}": rel_err(plain[k], t) for k, t in ref.state_dict().items() if k in plain}
    loaded = sf.load_pretrained(directory, config=sf.ShardConfig(tp_size=2))
    errs |= {f"loaded/{k}": rel_err(t, ref.state_dict()[k]) for k, t in sf.full_state_dict(loaded).items()}
    for name, p in model.named_parameters():  # the same local shards as shard_model cut
        errs[f"shard/{name}"] = rel_err(dict(loaded.named_parameters())[name], p)
    ids, _ = batch(2)
    with torch.no_grad():
        errs["logits"] = rel_err(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)
    inits = [sf.full_state_dict(sf.init_model(ref.config, config=sf.ShardConfig(tp_size=tp), seed=3)) for tp in (1, 2)]
    assert inits[0].keys() == inits[1].keys()
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0]), "init_model differs between tp 1 and 2"
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad
    return max(errs.values())


@pytest.mark.parametrize("tied", [False, True])
def test_phi3_tensor_parallel(pools, tied):
    """Phi-3's fused qkv_proj / gate_up_proj split per part (each rank its own q, k, v heads and
    gate, up rows); the attention reads this rank's head count from a per-rank config view."""
    assert max(pools(2).run(check_equivalence, "phi3", 2, tied)) <= TOL


def check_packed_load_zero3(directory, family):
    """The checkpoint loaded at tp 2 x ZeRO-3 over dp 2: each rank reads its dp chunk of its packed
    piece (the chunk crosses the parts along Phi-3's packed rows; GPT-2's parts lie along the
    other dimension); full weights and logits equal the unsharded model's."""
    import torch

    import shardformer as sf

    from .models import batch, build, rel_err

    ref = build(family)
    loaded = sf.load_pretrained(directory, config=sf.ShardConfig(tp_size=2, zero_stage=3))
    errs = {k: rel_err(t, ref.state_dict()[k]) for k, t in sf.full_state_dict(loaded).items()}
    ids, _ = batch(2)
    with torch.no_grad():
        errs["logits"] = rel_err(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad
    return max(errs.values())


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_packed_checkpoints(pools, tmp_path, family):
    """Saved at tp 2 -> plain HF tensors; loaded at tp 2 and at tp 2 x ZeRO-3 (dp 2); init_model."""
    directory = str(tmp_path / "ckpt")
    assert max(pools(2).run(check_packed_checkpoint, directory, family, False)) <= TOL
    assert max(pools(4).run(check_packed_load_zero3, directory, family)) <= TOL


def test_phi3_refuses_kv_replication():
    """tp = 4 > 2 KV heads: KV heads packed with the queries cannot be replicated; the plan (no
    process group needed) raises naming the config field and the fused projection."""
    from shardformer.policies import Phi3Policy
    from shardformer.tensor_parallel import plan_tensor_parallel

    from .models import build

    with pytest.raises(ValueError, match=r"tp_size=4 does not divide model.config.num_key_value_heads=2.*qkv_proj"):
        plan_tensor_parallel(build("phi3"), Phi3Policy(), 4)


def test_packed_shard_spec():
    """A packed spec: each rank's piece is its share of every part; merging the pieces gives the
    tensor back; `runs` over any sub-range of a piece (ZeRO-3's dp chunk) names exactly its entries."""
    import torch

    from shardformer.sharding import ShardSpec, merge_pieces, split_tensor

    for dim, parts, shards in [(0, (16, 4, 4), 2), (1, (6, 6, 6), 3), (0, (8, 8), 4)]:
        full = torch.arange(sum(parts) * 3).reshape((sum(parts), 3) if dim == 0 else (3, sum(parts)))
        spec = ShardSpec(dim, sum(parts), shards, parts=parts)
        pieces = [split_tensor(full, spec, r) for r in range(shards)]
        assert torch.equal(merge_pieces(pieces, spec), full)
        for r, piece in enumerate(pieces):
            starts = [sum(parts[:i]) for i in range(len(parts))]  # rank r: rows [r w, (r + 1) w) of each part
            mine = [full.narrow(dim, start + r * (part // shards), part // shards) for start, part in zip(starts, parts)]
            assert torch.equal(piece, torch.cat(mine, dim))
            for first in range(spec.local):
                for length in range(1, spec.local - first + 1):
                    got = torch.cat([full.narrow(dim, start, n) for _, start, n in spec.runs(r, first, length)], dim)
                    assert torch.equal(got, piece.narrow(dim, first, length)), (dim, parts, r, first, length)


# tests/models.py sets them for gemma2; Gemma 3's attention (transformers 5.17-5.24) reads no attention cap
GEMMA_CAPS = dict(attn_logit_softcapping=0.02, final_logit_softcapping=0.1)


@pytest.mark.parametrize("family,tied,caps", [("gemma2", True, False), ("gemma2", False, False),
                                              ("gemma3", True, False), ("gemma3", False, True)])
def test_gemma_tensor_parallel(pools, family, tied, caps):
    """Gemma 2 (attention and final-logit soft-capping) and Gemma 3 (per-head q / k norms, soft
    caps off by default, on with `caps`): sliding-window and full layers, scaled embeddings, (1 + w)
    norms, gelu(tanh) MLP, query_pre_attn_scalar 256 != head_dim."""
    overrides = GEMMA_CAPS if caps else {}
    assert max(pools(2).run(check_equivalence, family, 2, tied, **overrides)) <= TOL


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_kv_replicated(pools, family):
    """tp 4 over 2 KV heads: each KV head held by two ranks, its gradient summed over them."""
    assert max(pools(4).run(check_equivalence, family, 4, False)) <= TOL


def check_refused(family, **config):
    """shard_model raises ValueError on every rank; returns the message."""
    import shardformer as sf

    from .models import build

    with pytest.raises(ValueError) as err:
        sf.shard_model(build(family), config=sf.ShardConfig(**config))
    return str(err.value)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_ring_refused(pools, family):
    """Ring attention runs full causal blocks: Gemma's sliding windows refuse it at setup."""
    for message in pools(2).run(check_refused, family, sp_size=2, sp_mode="ring"):
        assert "sliding_window=4" in message and "all_to_all" in message, message


def check_gemma_outputs(family, caps):
    """The loss path: with a final-logit soft cap the vocab-parallel loss runs on the capped,
    vocab-split logits (the fused loss, which never builds logits, is skipped); without one the
    fused loss runs. Without labels the capped logits are gathered whole; greedy generation
    (sliding-window cache) gives the unsharded model's tokens."""
    import copy

    import torch

    import shardformer as sf

    from .models import batch, build, rel_err

    ref = build(family, tied=True, **(GEMMA_CAPS if caps else {}))
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=2))
    ids, labels = batch(2)
    out = model(input_ids=ids, labels=labels)
    if caps:
        head = model.lm_head
        assert out.logits.shape[-1] == head.vocab_valid and float(out.logits.abs().max()) <= 0.1
        want = ref(input_ids=ids).logits[..., head.vocab_start:head.vocab_start + head.vocab_valid]
        assert rel_err(out.logits, want) <= TOL
    else:
        assert out.logits is None  # fused linear + cross-entropy
    errs = [rel_err(out.loss, ref(input_ids=ids, labels=labels).loss)]
    model.eval(), ref.eval()
    with torch.no_grad():
        errs.append(rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits))
        greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1, :6], **greedy), ref.generate(ids[:1, :6], **greedy))
    assert max(errs) <= TOL, errs
    return max(errs)


@pytest.mark.parametrize("family,caps", [("gemma2", True), ("gemma3", False)])
def test_gemma_loss_paths_and_generate(pools, family, caps):
    assert max(pools(2).run(check_gemma_outputs, family, caps)) <= TOL


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_tensor_parallel(pools, tied):
    """GPT-2's Conv1D layers ([in, out] weights), fused c_attn split per q / k / v part, learned
    positions and LayerNorms replicated, row-parallel biases added once."""
    assert max(pools(2).run(check_equivalence, "gpt2", 2, tied)) <= TOL


def test_gpt2_refusals(pools):
    """Refused at setup, on every rank: pipelines (HF adds the learned positions to inputs_embeds:
    a later stage would add them again) and all_to_all / ring (GPT-2 reshapes its final hidden
    states to the whole sequence, which those modes keep a chunk)."""
    for message in pools(2).run(check_refused, "gpt2", pp_size=2):
        assert "GPT2Policy.position_embedding='wpe'" in message and "pp_size=2" in message, message
    for mode in ("all_to_all", "ring"):
        for message in pools(2).run(check_refused, "gpt2", sp_size=2, sp_mode=mode):
            assert "GPT2Policy.whole_sequence_output=True" in message and repr(mode) in message, message


def test_unknown_embedding_forward_refused():
    """An nn.Embedding subclass with its own forward (Gemma's scaled embedding) under a policy that
    does not describe it: refused at planning, naming the policy entry, never silently dropped."""
    import dataclasses

    from shardformer.policies import Gemma2Policy
    from shardformer.tensor_parallel import plan_tensor_parallel

    from .models import build

    with pytest.raises(ValueError, match=r"Gemma2Policy.embedding_scale=None.*Gemma2TextScaledWordEmbedding"):
        plan_tensor_parallel(build("gemma2"), dataclasses.replace(Gemma2Policy(), embedding_scale=None), 2)


# Mixtral: 4 experts (2 per token), each expert's intermediate size split over tp
AUX = dict(output_router_logits=True, router_aux_loss_coef=0.5)  # the router aux loss on, weighted to matter


@pytest.mark.parametrize("tp,tied,aux,impl", [(2, False, False, None), (2, True, False, None), (2, False, True, None),
                                              (2, False, True, "eager"), (2, False, False, "batched_mm"),
                                              (4, False, True, None)])
def test_mixtral_tensor_parallel(pools, tp, tied, aux, impl):
    """Experts split per intermediate dimension (gate / up packed parts column-wise, down row-wise),
    router replicated; with `output_router_logits` the loss includes the router aux loss (the
    fused LM loss is skipped then); each experts implementation HF dispatches to; at tp 4 the two
    KV heads are replicated too."""
    overrides = {**(AUX if aux else {}), **({"experts_implementation": impl} if impl else {})}
    assert max(pools(tp).run(check_equivalence, "mixtral", tp, tied, **overrides)) <= TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_mixtral_pipeline(pools, tp):
    world = 2 * tp
    assert max(pools(world).run(check_pipeline, 2, "1f1b", 2, False, tp=tp, family="mixtral")) <= TOL


def test_mixtral_refusals(pools):
    """Refused at setup, on every rank: split_gather (the experts' all-reduce needs the same tokens
    on every tp rank), and with the router aux loss on, pipelines and the sp-axis modes (the aux
    loss needs every layer's router output over every token)."""
    for message in pools(2).run(check_refused, "mixtral", tp_size=2, sp_mode="split_gather"):
        assert "sp_mode='split_gather'" in message and "MixtralPolicy.experts" in message, message
    for config in (dict(pp_size=2), dict(sp_size=2, sp_mode="all_to_all"), dict(sp_size=2, sp_mode="ring")):
        for message in pools(2).run(check_refused_with, "mixtral", AUX, **config):
            assert "output_router_logits=True" in message and "MixtralPolicy.loss_terms" in message, message


def check_refused_with(family, overrides, **config):
    """check_refused for a model built with config `overrides`."""
    import shardformer as sf

    from .models import build

    with pytest.raises(ValueError) as err:
        sf.shard_model(build(family, **overrides), config=sf.ShardConfig(**config))
    return str(err.value)


def check_mixtral_outputs():
    """The router aux loss of the tp 2 model equals the unsharded one (and is part of its loss);
    the router logits HF records are the unsharded ones; greedy generation gives the same tokens."""
    import copy

    import torch

    import shardformer as sf

    from .models import batch, build, rel_err

    ref = build("mixtral", **AUX)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=2))
    ids, labels = batch(2)
    out, want = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    errs = [rel_err(out.aux_loss, want.aux_loss), rel_err(out.loss, want.loss)]
    errs += [rel_err(a, b) for a, b in zip(out.router_logits, want.router_logits, strict=True)]
    model.eval(), ref.eval()
    with torch.no_grad():
        errs.append(rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits))
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1, :6], **greedy), ref.generate(ids[:1, :6], **greedy))
    assert float(want.aux_loss.detach()) > 0 and max(errs) <= TOL, errs
    return max(errs)


def test_mixtral_aux_loss_and_generate(pools):
    assert max(pools(2).run(check_mixtral_outputs)) <= TOL


def check_mixtral_checkpoint(directory):
    """check_packed_checkpoint, init_model included (the experts and the router drawn whole from
    normal(0, initializer_range), then cut)."""
    return check_packed_checkpoint(directory, "mixtral", False)


def test_mixtral_checkpoints(pools, tmp_path):
    """The 3-D expert tensors: saved at tp 2 -> HF's tensors (`from_pretrained` equals the unsharded
    model), loaded back at tp 2 into the same shards and at tp 2 x ZeRO-3 (dp 2); `init_model`
    gives bit-identical full weights at tp 1 and 2."""
    directory = str(tmp_path / "ckpt")
    assert max(pools(2).run(check_mixtral_checkpoint, directory)) <= TOL
    assert max(pools(4).run(check_packed_load_zero3, directory, "mixtral")) <= TOL


# BERT: encoder, post-LayerNorm, masked-LM head kept gathered (BERT computes its own loss)
@pytest.mark.parametrize("family,tied", [("bert", True), ("bert", False), ("bert-seqcls", False)])
def test_bert_tensor_parallel(pools, family, tied):
    """Heads split (per-rank `num_attention_heads` / `all_head_size`), intermediate column- and
    output dense row-parallel (bias added once), word embedding vocab-parallel, position and
    token-type embeddings, LayerNorms, pooler and classifier replicated; the masked-LM decoder
    (tied or not) with its own bias, its logits gathered for BERT's own unshifted loss."""
    assert max(pools(2).run(check_equivalence, family, 2, tied)) <= TOL


def test_bert_refusals(pools):
    for config in (dict(pp_size=2), dict(tp_size=2, sp_mode="split_gather"), dict(sp_size=2, sp_mode="all_to_all")):
        for message in pools(2).run(check_refused, "bert", **config):
            assert "BertPolicy.refused" in message and "BertForMaskedLM" in message, message


def check_mixtral_zero(stage):
    """tp 2 x dp 2 with ZeRO `stage` (the expert pieces' master weights and AdamW state sharded
    over dp): 2 AdamW steps with clipping, against the unsharded model. Without the router aux
    loss: it is not additive over rows (a product of per-expert means over the batch), so with
    dp each replica's is its own rows' (as under DDP), not the whole batch's."""
    import copy

    import torch

    import shardformer as sf

    from .models import assert_within, batch, build, rel_err, step_and_compare_weights
    from .test_equivalence import ADAMW

    ref = build("mixtral")
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=2, zero_stage=stage))
    opt = sf.ZeroOptimizer(torch.optim.AdamW(model.parameters(), **ADAMW), model)
    ref_opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    dp, dp_rank = model.sf_mesh["dp"].size(), model.sf_mesh.get_local_rank("dp")
    mine, errs = slice(2 * dp_rank, 2 * dp_rank + 2), {}
    for step in range(2):
        ids, labels = batch(2 * dp, seed=step + 1)
        ref_loss = ref(input_ids=ids, labels=labels).loss
        ref_loss.backward()
        errs[f"step{step}/loss"] = rel_err(model.forward_backward(input_ids=ids[mine], labels=labels[mine]), ref_loss)
        errs[f"step{step}/norm"] = rel_err(opt.clip_grad_norm_(0.5), torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
        step_and_compare_weights(errs, step, model, ref, (ref_opt, opt))
    return assert_within(errs, TOL)


@pytest.mark.parametrize("stage", [1, 3])
def test_mixtral_zero(pools, stage):
    assert max(pools(4).run(check_mixtral_zero, stage)) <= TOL
