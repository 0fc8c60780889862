"""Bad input raises ValueError at setup, before any collective, naming the config field and the
model attribute. "Before any collective" is checked by making every collective entry point raise
while shard_model runs, so a check that came too late would fail with that error instead. The one
collective allowed is the ranks' agreement on the error itself (`comm.agree_on_failure`), which
lets a failure on one rank stop every rank."""
import copy
import inspect
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from transformers import OPTConfig, OPTForCausalLM

import shardformer as sf
from shardformer import comm, mesh
from shardformer.policies import LlamaPolicy

from . import standin_ext
from .models import build


def _in_agreement() -> bool:
    return any(f.function in ("agree_on_failure", "raise_if_failed") for f in inspect.stack())


def _no_collectives():
    def guard(original):
        def boom(*a, **k):
            if _in_agreement():
                return original(*a, **k)
            raise AssertionError("a collective ran before the ValueError")

        return boom

    names = ["all_reduce", "all_gather", "broadcast", "barrier", "new_group", "all_gather_object"]
    patches = [mock.patch.object(dist, n, guard(getattr(dist, n))) for n in names]
    patches.append(mock.patch("shardformer.mesh.init_device_mesh", guard(mesh.init_device_mesh)))
    patches += [mock.patch(f"shardformer.comm.{n}", guard(getattr(comm, n))) for n in ("_all_reduce", "_all_gather")]
    return patches


def _expect_value_error(model, cfg, *fragments, policy=None):
    patches = _no_collectives()
    for p in patches:
        p.start()
    try:
        with pytest.raises(ValueError) as info:
            sf.shard_model(model, policy=policy, config=cfg)
    finally:
        for p in patches:
            p.stop()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return str(info.value)


class MissingEntryPolicy(LlamaPolicy):
    column_parallel = LlamaPolicy.column_parallel + ("mlp.no_such_proj",)


class OptionalEntryPolicy(MissingEntryPolicy):
    optional = ("mlp.no_such_proj",)


class MissingFusedPolicy(LlamaPolicy):
    fused_norms = LlamaPolicy.fused_norms + ("no_such_norm",)


class OptionalFusedPolicy(MissingFusedPolicy):
    optional = ("no_such_norm",)


def check_setup_errors():
    model = build("llama")  # 8 heads, 2 KV heads, world of 2
    _expect_value_error(model, sf.ShardConfig(tp_size=3), "ShardConfig.tp_size=3",
                        "torch.distributed.get_world_size()=2")
    # an architecture with no policy (GPT-2 has one now)
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=32,
                                   word_embed_proj_dim=16, vocab_size=50))
    msg = _expect_value_error(opt, sf.ShardConfig(tp_size=2), "model.config.model_type='opt'", "llama",
                              "register_policy")
    _expect_value_error(copy.deepcopy(model), sf.ShardConfig(tp_size=2), "MissingEntryPolicy.column_parallel",
                        "mlp.no_such_proj", policy=MissingEntryPolicy())
    unfused = copy.deepcopy(model)
    _expect_value_error(unfused, sf.ShardConfig(tp_size=2), "MissingFusedPolicy.fused_norms", "no_such_norm",
                        policy=MissingFusedPolicy())
    assert type(unfused.model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"  # nothing swapped
    with standin_ext.installed():  # an extension (the CPU stand-in): fused modules are substituted
        fused = sf.shard_model(copy.deepcopy(model), policy=OptionalFusedPolicy, config=sf.ShardConfig(tp_size=2))
    assert type(fused.model.layers[0].input_layernorm).__name__ == "FusedRMSNorm"
    capped = copy.deepcopy(model)
    capped.model.embed_tokens.max_norm = 1.0
    _expect_value_error(capped, sf.ShardConfig(tp_size=2), "model.model.embed_tokens.max_norm=1.0")
    assert type(capped.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # refused before any change
    sharded = sf.shard_model(copy.deepcopy(model), policy=OptionalEntryPolicy, config=sf.ShardConfig(tp_size=2))
    _expect_value_error(sharded, sf.ShardConfig(tp_size=2), "already sharded")
    return msg


def check_head_divisibility():
    """On 4 ranks: 6 query heads do not split over tp=4; 3 KV heads neither divide tp=2 nor are
    divided by it; an MLP width of 90 does not split over tp=4."""
    six = build("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    _expect_value_error(six, sf.ShardConfig(tp_size=4), "ShardConfig.tp_size=4", "model.config.num_attention_heads=6")
    three_kv = build("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    _expect_value_error(three_kv, sf.ShardConfig(tp_size=2), "ShardConfig.tp_size=2",
                        "model.config.num_key_value_heads=3")
    kv3 = build("llama", num_attention_heads=12, num_key_value_heads=3, hidden_size=48)
    _expect_value_error(kv3, sf.ShardConfig(tp_size=4), "ShardConfig.tp_size=4",
                        "multiple of", "model.config.num_key_value_heads=3")
    wide = build("llama", intermediate_size=90)
    _expect_value_error(wide, sf.ShardConfig(tp_size=4), "ShardConfig.tp_size=4", "mlp.gate_proj.out_features=90")
    flash = build("llama")
    flash.config._attn_implementation = "flash_attention_2"
    _expect_value_error(flash, sf.ShardConfig(sp_size=4, sp_mode="all_to_all"), "ShardConfig.sp_mode='all_to_all'",
                        "model.config._attn_implementation='flash_attention_2'")
    windowed = build("mistral", sliding_window=8)  # ring runs full causal attention: no window
    _expect_value_error(windowed, sf.ShardConfig(sp_size=4, sp_mode="ring"), "ShardConfig.sp_mode='ring'",
                        "model.config.sliding_window=8")
    six_sp = build("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    _expect_value_error(six_sp, sf.ShardConfig(tp_size=1, sp_size=4, sp_mode="all_to_all"), "ShardConfig.sp_size=4",
                        "model.config.num_attention_heads=6")
    return True


def test_setup_errors(pools):
    pools(2).run(check_setup_errors)


def test_head_divisibility(pools):
    pools(4).run(check_head_divisibility)


def test_shard_model_needs_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torchrun"):
        sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=2))


@pytest.mark.parametrize("field,value", [("tp_size", 0), ("sp_mode", "bogus"), ("pp_schedule", "x"),
                                         ("zero_stage", 5), ("num_microbatches", 0),
                                         # by type, as tp_size is: no bool for an int, no float for an int
                                         ("zero_stage", 0.0), ("zero_stage", False), ("zero_stage", 2.0),
                                         ("num_microbatches", True), ("num_microbatches", 2.0), ("tp_size", True),
                                         ("pp_size", 1.0), ("sp_mode", 1), ("pp_schedule", None),
                                         ("check_batch", 1), ("enable_fused_kernels", None)])
def test_config_validates_itself(field, value):
    with pytest.raises(ValueError, match=f"ShardConfig.{field}"):
        sf.ShardConfig(**{field: value})


@pytest.mark.parametrize("kwargs,field", [(dict(sp_mode="split_gather", tp_size=1), "tp_size"),
                                          (dict(sp_mode="split_gather", tp_size=2, sp_size=2), "sp_size"),
                                          (dict(sp_mode="all_to_all"), "sp_size"),
                                          (dict(sp_mode="ring", sp_size=1), "sp_size")])
def test_sequence_parallel_layout_errors(kwargs, field):
    """split_gather runs on the tp group (tp_size > 1, sp_size stays 1); all_to_all and ring need
    sp_size > 1; the error names the field."""
    with pytest.raises(ValueError, match=f"ShardConfig.{field}"):
        sf.ShardConfig(**kwargs)


@pytest.mark.parametrize("field,value", [("pp_schedule", "gpipe"), ("num_microbatches", 4),
                                         ("pp_stage_layers", (1, 1))])
def test_pipeline_fields_need_pipeline(field, value):
    """Pipeline settings without pp_size > 1 would silently do nothing: refused by name."""
    with pytest.raises(ValueError, match=f"ShardConfig.{field}=.*needs ShardConfig.pp_size > 1"):
        sf.ShardConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("pp_stage_layers", (2, 0)), ("pp_stage_layers", ()),
                                         ("pp_stage_layers", (2.0, 2)), ("pp_stage_layers", 4),
                                         ("pipeline_timeout_s", 0), ("pipeline_timeout_s", True)])
def test_pipeline_fields_validate_themselves(field, value):
    with pytest.raises(ValueError, match=f"ShardConfig.{field}"):
        sf.ShardConfig(pp_size=2, **{field: value})



def check_out_of_range_ids(fused):
    """An id or label >= vocab_size raises (as HF's nn.Embedding / F.cross_entropy do) instead of
    being looked up as zeros / ignored by the vocab-split layers."""
    model = sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=2, enable_fused_kernels=fused))
    ids = torch.ones(1, 6, dtype=torch.long)
    bad = ids.clone()
    bad[0, 2] = 250
    with pytest.raises(RuntimeError, match="input id out of range"):
        model(input_ids=bad)
    with pytest.raises(RuntimeError, match="label out of range"):
        model(input_ids=ids, labels=bad)
    with pytest.raises(RuntimeError, match="input id out of range"):  # raises inside a fused-loss call
        model(input_ids=bad, labels=ids)
    assert model(input_ids=ids).logits.shape == (1, 6, 250)  # nothing left over from the failed calls
    return True


@pytest.mark.parametrize("fused", [True, False])
def test_out_of_range_ids_raise(pools, fused):
    pools(2).run(check_out_of_range_ids, fused)


def test_policies_are_frozen_hashable_and_picklable():
    """Policies are frozen dataclass instances: hashable, picklable (spawned workers), copyable;
    a subclass may write lists and dicts, which become tuples and read-only mappings."""
    import dataclasses
    import pickle

    policy = LlamaPolicy()
    assert pickle.loads(pickle.dumps(policy)) == policy == copy.deepcopy(policy)
    assert hash(policy) == hash(LlamaPolicy())
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.fused_mlp = None
    with pytest.raises(TypeError, match="read-only"):
        policy.tp_input_copies["x"] = ("y",)

    class ListPolicy(LlamaPolicy):
        column_parallel = ["self_attn.q_proj", "self_attn.k_proj"]
        tp_input_copies = {**LlamaPolicy.tp_input_copies, "extra": ["self_attn.q_proj"]}

    listed = ListPolicy()
    assert listed.column_parallel == ("self_attn.q_proj", "self_attn.k_proj")
    assert listed.tp_input_copies["extra"] == ("self_attn.q_proj",) and listed.name == "ListPolicy"
    assert dataclasses.replace(listed, row_parallel=["a"]).row_parallel == ("a",)
