"""`sf.infer_policy`: policies derived from transformers' tp plans or a torch.fx trace of one
block, checked on that block.

1. For every registered decoder-only policy it derives the hand-written split: from the model as
   it is (its tp plan where it translates, else the trace), and from the trace alone (plan removed);
   OLMo 2 / 3 / OLMoE's RMSNorms over all heads' q / k features included (`split_norms`).
2. Architectures with no hand-written policy shard at tp = 2 through `shard_model(model)` alone
   and train like the unsharded model (loss, every gradient, weights after AdamW; fp32, 1e-5);
   some through their tp plan, some (no plan) through the trace; a plan-derived and a traced one
   also under sequence (all_to_all, split_gather) and pipeline parallelism.
3. What it cannot handle is a ValueError naming the block / entry / op and docs/policies.md; a
   norm over split features that is no plain RMSNorm is refused with its op and why.
4. The worked example of docs/policies.md (a policy for StableLM, written by hand) trains at
   tp = 2 like the unsharded model.
"""
import copy
import dataclasses
import pathlib
import re
import warnings
import zlib

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

import shardformer as sf
from shardformer.policies import base as policy_base

from .models import DIMS, batch, capture_logs, grad_errors, rel_err

TOL = 1e-5
ADAMW = dict(lr=1e-3, eps=1e-4)  # see test_equivalence.py: eps keeps AdamW's first step Lipschitz
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "policies.md"

# Decoder-only architectures with no hand-written policy here, with the config changes they need on
# top of DIMS: head_dim = hidden / heads where the config defaults to 128 or 256, no dropout.
UNREGISTERED = {
    "olmo": {}, "granite": {}, "cohere": {}, "cohere2": {}, "starcoder2": {}, "smollm3": {}, "arcee": {},
    "apertus": {}, "seed_oss": {"head_dim": 8, "attention_dropout": 0.0, "residual_dropout": 0.0},
    "ernie4_5": {"head_dim": 8}, "exaone4": {},
    "ministral3": {"head_dim": 8}, "nanochat": {}, "phi": {}, "vaultgemma": {"head_dim": 8},
    "helium": {"head_dim": 8}, "internlm3": {"head_dim": 8},
}
# No usable tp plan on the newest transformers (none, or entries with no faithful translation):
# their split comes from the trace. GPT-NeoX packs q / k / v per head in one projection, GLM-4
# fuses gate / up, Cohere2-MoE and Qwen3-MoE have stacked experts (Cohere2-MoE's plan on 5.17 splits
# only the attention), Qwen2-MoE also a shared expert weighed by a one-output gate (replicated);
# GLM-4.5 (glm4_moe) and AFMoE have a dense first layer and expert layers after it (each kind is
# traced and checked; entries of one kind are `optional` in the other). FlexOLMo normalises q and k
# over all heads, as OLMo 2 (`split_norms`), and has stacked experts.
MOE = {"num_experts": 4, "moe_intermediate_size": 32, "num_experts_per_tok": 2, "head_dim": 8}
TRACED = {"stablelm": {}, "persimmon": {"num_key_value_heads": None}, "gpt_neox": {"num_key_value_heads": None}, "glm4": {"head_dim": 8}, "cohere2_moe": {"head_dim": 8},
          "qwen3_moe": MOE, "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 48},
          "glm4_moe": {**MOE, "n_routed_experts": 4, "n_group": 1, "topk_group": 1}, "afmoe": MOE,
          "flex_olmo": {"num_experts": 4, "num_experts_per_tok": 2}}
NO_PLAN = {"stablelm", "persimmon"}  # no tp plan in any supported transformers: the notice says "trace"
COMPARED = ("embedding", "layers", "lm_head", "final_norm", "attention", "column_parallel", "row_parallel",
            "query_projections", "kv_projections", "tp_partial", "attention_local_attrs", "packed", "experts",
            "attention_local_config", "position_embedding", "whole_sequence_output", "split_norms")
# Registered families that are decoder-only causal LMs (BERT is an encoder).
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "mixtral",
            "olmo2", "olmo3", "olmoe")
# Config changes of registered families (as tests/models.py): few experts, OLMo 3's sliding windows.
REGISTERED = {"olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
              "olmo3": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}}
# No plan that translates (q / k / v gathered around OLMo's norms over all heads): traced as is.
PLAN_UNTRANSLATED = {"phi3", "gpt2", "mixtral", "olmo2", "olmo3", "olmoe"}


def build(model_type: str, seed: int = 0, **overrides):
    """A tiny fp32 causal LM of `model_type` (DIMS: hidden 64, 2 layers, 8 heads, 2 KV heads, vocab 250)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {**UNREGISTERED, **TRACED, **REGISTERED}.get(model_type, {})
        config = CONFIG_MAPPING[model_type](**{**DIMS, **extra, **overrides})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # zero-initialised biases would hide a wrong bias split (and make the
        for name, p in model.named_parameters():  # weights after AdamW tiny: an ill-conditioned comparison)
            if not p.any():
                p.normal_(0, 0.02)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # ones: a piece cut wrong would not show
                p.normal_(1.0, 0.1)
    return model


def _split(policy) -> dict:
    """The fields that say how a model splits, order-free."""
    out = {}
    for name in COMPARED:
        value = getattr(policy, name)
        out[name] = set(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value
    out["tp_input_copies"] = {k: set(v) for k, v in policy.tp_input_copies.items()}
    return out


@pytest.mark.parametrize("source", ["as is", "trace alone"])
def test_derives_the_hand_written_split(source):
    """Every registered decoder-only family: the same split as its hand-written policy, from the
    model as it is (its tp plan where every entry translates, else the trace) and from the trace
    alone (the config's tp plan removed)."""
    from shardformer.policies.infer import _infer

    sources = {}
    for model_type in DECODERS:
        model = build(model_type)
        hand = sf.policies.get_policy(model)
        if source == "trace alone":
            model.config.base_model_tp_plan = None
        derived, sources[model_type] = _infer(model, 2)
        want, got = _split(hand), _split(derived)
        assert got == want, (model_type, {k: (got[k], want[k]) for k in want if got[k] != want[k]})
    traced = {t for t, s in sources.items() if "trace" in s}
    assert traced == (set(DECODERS) if source == "trace alone" else PLAN_UNTRANSLATED), sources


def test_trace_at_tp4_replicates_kv_heads():
    """The trace follows the split at a rank count dividing both head counts; at tp 4 over 2 KV
    heads (replicated) it still derives the hand-written split (Phi-3 packs its KV heads with the
    queries, which are never replicated: the engine refuses that at tp 4 either way); OLMo 2's
    k_norm over the replicated KV heads is checked with each row's sum of squares counted once."""
    for model_type in ("llama", "qwen3", "gemma2", "mixtral", "olmo2", "olmoe"):
        model = build(model_type)
        hand = sf.policies.get_policy(model)
        model.config.base_model_tp_plan = None
        assert _split(sf.infer_policy(model, tp_size=4)) == _split(hand), model_type


def check_traced_at_tp4() -> float:
    return _train_and_compare("stablelm", tp=4)


def test_traced_policy_trains_at_tp4(pools):
    assert max(pools(4).run(check_traced_at_tp4)) <= TOL


def test_prints_itself_as_source():
    policy = sf.infer_policy(build("qwen3"))
    source = policy.to_source()
    assert "@register_policy\nclass Qwen3Policy(Policy):" in source and "tp_partial = (" in source
    namespace = {}
    exec(source.replace("@register_policy\n", ""), namespace)  # noqa: S102 - our own output
    again = namespace["Qwen3Policy"]()
    assert {f.name: getattr(again, f.name) for f in dataclasses.fields(again)} == \
        {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}


def _train_and_compare(model_type: str, derived: bool = True, tp: int = 2, meta: bool = False, **layout) -> float:
    """shard_model(model) at tp and `layout` (more ShardConfig fields; policy None: derived, with
    its notice on rank 0, or registered), one AdamW step; the worst relative error of loss,
    gradients and weights against the unsharded model. `meta`: the model is built by
    `sf.init_model` (sharded on the meta device, so the policy is checked on a fresh one-layer
    model) and the reference given its weights (those init_model zeroes made random, as in build)."""
    ref = build(model_type)
    config = sf.ShardConfig(tp_size=tp, **layout)
    with capture_logs() as logs:
        if meta:
            model = sf.init_model(ref.config, config=config, seed=3)
            with torch.no_grad():  # init_model's zero biases start at random too (as in build), alike on every rank
                for name, p in model.named_parameters():
                    if not p.any():
                        p.normal_(0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
            fresh = dict(ref.named_buffers())  # every buffer as HF initialises it (GLM-4.5's router bias too)
            assert {n: b for n, b in model.named_buffers()}.keys() == fresh.keys()
            assert all(torch.equal(b, fresh[n]) for n, b in model.named_buffers()), model_type
            ref.load_state_dict(sf.full_state_dict(model))
        else:
            model = sf.shard_model(copy.deepcopy(ref), config=config)
    if derived and torch.distributed.get_rank() == 0:
        notices = [m for m in logs.messages if "no policy registered" in m]
        assert len(notices) == 1 and "derived" in notices[0] and "\n" not in notices[0], logs.messages
        source = re.search(r"from (config\.base_model_tp_plan|a torch\.fx trace of one decoder block) ", notices[0])
        assert source and (model_type not in NO_PLAN or "torch.fx" in source[1]), notices[0]
    kinds = {type(m).__name__ for m in model.modules()}
    if tp > 1:
        assert {"ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding"} <= kinds, kinds
    ids, labels = batch(2, vocab=ref.config.vocab_size)
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    loss = model.forward_backward(input_ids=ids, labels=labels)
    errs = {"loss": rel_err(loss, ref_loss.detach())} | {f"grad/{k}": v for k, v in grad_errors(model, ref).items()}
    if config.pp_size == 1:  # every parameter is compared (ties counted once); stages: below
        assert len(errs) > len(list(ref.parameters())) // 2
    for m in (ref, model):
        opt = torch.optim.AdamW(m.parameters(), **ADAMW)
        opt.step()
    full, ref_state = sf.full_state_dict(model), ref.state_dict()
    errs |= {f"weight/{k}": rel_err(t, ref_state[k]) for k, t in full.items()}  # a pipeline stage: its own
    held = [None] * torch.distributed.get_world_size()  # every tensor of the model lives on some rank
    torch.distributed.all_gather_object(held, sorted(full))
    assert set().union(*held) == set(ref_state), set(ref_state) - set().union(*held)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{model_type}: relative errors above {TOL}: {bad}"
    return max(errs.values())


def check_unregistered(model_types: list[str]) -> dict:
    worst = {t: _train_and_compare(t) for t in model_types}
    built_sharded = ("olmo", "phi", "stablelm", "glm4_moe")  # GLM-4.5: its TopkRouter initialised as HF does
    return worst | {f"{t} (init_model)": _train_and_compare(t, meta=True) for t in built_sharded}


def test_unregistered_architectures_train_like_unsharded(pools):
    """At least 10 architectures with no hand-written policy, through shard_model(model) alone."""
    present = [t for t in {**UNREGISTERED, **TRACED} if t in CONFIG_MAPPING and t not in sf.policies.supported_model_types()]
    missing = sorted((set(UNREGISTERED) | set(TRACED)) - set(present))
    print(f"not in this transformers or registered meanwhile: {missing}")
    assert len(present) >= 10, present
    # a model on the meta device is probed on a fresh model with one layer of each kind
    whole = build("glm4_moe")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(whole.config)
    assert _split(sf.infer_policy(meta)) == _split(sf.infer_policy(whole))
    # Qwen3-MoE's experts come from the trace (on 5.17 too): split over tp, not left whole
    assert sf.infer_policy(build("qwen3_moe")).experts == {"mlp.experts": {"gate_up_proj": "column", "down_proj": "row"}}
    worst = pools(2).run(check_unregistered, present)
    assert all(max(w.values()) <= TOL for w in worst), worst


LAYOUTS = {"all_to_all sp2": dict(tp=1, sp_size=2, sp_mode="all_to_all"), "split_gather tp2": dict(sp_mode="split_gather"),
           "pp2": dict(tp=1, pp_size=2, num_microbatches=2)}


def check_derived_layouts() -> dict:
    """A plan-derived (olmo) and a traced (stablelm) policy under sequence and pipeline parallelism."""
    return {f"{t} {name}": _train_and_compare(t, **layout) for t in ("olmo", "stablelm") for name, layout in LAYOUTS.items()}


def test_derived_policies_with_sequence_and_pipeline_parallelism(pools):
    worst = pools(2).run(check_derived_layouts)
    assert all(max(w.values()) <= TOL for w in worst), worst


class _NormalizedMLP(torch.nn.Module):
    """LLaMA's MLP with its hidden features normalised (over all of them) before down_proj."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        h = torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(torch.nn.functional.normalize(h, dim=-1))


def _normalized(model):
    """`model` (a LLaMA) with each MLP normalising its hidden features (_NormalizedMLP)."""
    for layer in model.model.layers:
        layer.mlp = _NormalizedMLP(layer.mlp)
    return model


def _raises(model, *patterns):
    with pytest.raises(ValueError) as info:
        sf.infer_policy(model)
    for pattern in patterns + ("docs/policies.md",):
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_what_it_cannot_handle_is_a_value_error():
    # no tp plan, and the trace meets an op the split cannot pass (StableLM's per-head q norms
    # split the heads one by one): names the block, the module, the op and its source line
    _raises(build("stablelm", qk_layernorm=True), r"base_model_tp_plan has no entry",
            r"a torch\.fx trace of model\.model\.layers\.0 \(StableLmDecoderLayer\) found no split",
            r"op aten\.split\.Tensor in model\.model\.layers\.0\.self_attn\.q_layernorm \(StableLmLayerNormPerHead\)",
            r"modeling_stablelm\.py:\d+: ")
    # a plan entry with no faithful translation: named, then the trace's stop (Doge masks attention
    # per head with a mask computed from all heads' values: whole on every rank, over all heads)
    _raises(build("doge"), r"base_model_tp_plan\['layers\.\*\.mlp\.router_gate'\]='\w+' has no faithful",
            r"a torch\.fx trace of model\.model\.layers\.0 \(DogeDecoderLayer\) found no split",
            r"op aten\.\w+(\.\w+)? in model\.model\.layers\.0\.self_attn \(DogeAttention\)",
            r"modeling_doge\.py:\d+: ", r"attends with a mask / bias split along dim None or whole over 8 heads")
    # an op that would need every rank's features between two linears (a norm over the MLP's
    # split features, F.normalize: linalg_vector_norm, whose dims follow its `ord`)
    model = _normalized(build("llama"))
    model.config.base_model_tp_plan = None
    _raises(model, r"op aten\.linalg_vector_norm\.default in model\.model\.layers\.0\.mlp \(_NormalizedMLP\)",
            r"test_infer_policy\.py:\d+: ", r"runs over dim 2, which is split over tp")
    # a plan that splits wrongly (edited here) on a block the trace cannot handle either: the block
    # check names the block and the op, then the trace's stop
    model = _normalized(build("llama"))
    model.config.base_model_tp_plan = {**model.config.base_model_tp_plan, "layers.*.mlp.up_proj": "rowwise",
                                       "layers.*.mlp.down_proj": "colwise"}
    _raises(model, r"the split of model\.config\.base_model_tp_plan failed its check \(model\.model\.layers\.0 "
            r"\(LlamaDecoderLayer\) failed", r"RuntimeError in forward \(", r"op aten\.linalg_vector_norm")
    # a plan split that runs but computes something else (a norm whose gradient is complete on
    # every rank declared partial): the block check names the block and the gradient
    model = _normalized(build("llama"))
    model.config.base_model_tp_plan = {**{k: v for k, v in model.config.base_model_tp_plan.items() if "mlp" not in k},
                                       "layers.*.input_layernorm": "replicated_with_grad_allreduce"}
    _raises(model, r"does not reproduce model\.model\.layers\.0 at tp=2: input_layernorm\.weight's gradient",
            r"op aten\.linalg_vector_norm")


def test_a_norm_over_split_features_must_be_a_plain_rms_norm():
    """OLMo 2's q / k norms over all heads are split norms only as weight * x / sqrt(mean(x^2) + eps)
    (`rms_norm_form`): a LayerNorm (mean subtracted, a bias) or Gemma's (1 + weight) in their place
    stops the trace at the norm's op, saying why."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = build("olmo2")
    for layer in model.model.layers:
        layer.self_attn.q_norm = torch.nn.LayerNorm(layer.self_attn.q_proj.out_features)
    _raises(model, r"op aten\.native_layer_norm\.default in model\.model\.layers\.0\.self_attn\.q_norm \(LayerNorm\)",
            r"modeling_olmo2\.py:\d+: query_states = self\.q_norm", r"runs over dim 2, which is split over tp",
            r"model\.model\.layers\.0\.self_attn\.q_norm \(LayerNorm\) is not an RMSNorm with one 1-D `weight`")
    model = build("olmo2")
    for layer in model.model.layers:
        layer.self_attn.k_norm = GemmaRMSNorm(layer.self_attn.k_proj.out_features, eps=1e-6)
    _raises(model, r"op aten\.mean\.dim in model\.model\.layers\.0\.self_attn\.k_norm \(GemmaRMSNorm\)",
            r"modeling_gemma\.py:\d+: ", r"does not compute weight \* x / sqrt\(mean\(x\^2\) \+ eps\)")


def test_a_wrong_plan_falls_back_to_the_trace():
    """A plan whose split fails the block check (edited here: up / down swapped, a norm declared
    partial) is replaced by the trace's split, which is the hand-written one."""
    from shardformer.policies.infer import _infer

    for edit in ({"layers.*.mlp.up_proj": "rowwise", "layers.*.mlp.down_proj": "colwise"},
                 {"layers.*.input_layernorm": "replicated_with_grad_allreduce"}):
        model = build("llama")
        model.config.base_model_tp_plan = {**model.config.base_model_tp_plan, **edit}
        policy, source = _infer(model, 2)
        assert _split(policy) == _split(sf.policies.get_policy(model)) and "torch.fx" in source, (edit, source)


def check_shard_model_raises_everywhere() -> str:
    """Before any collective but the ranks' agreement on the error (test_errors' check)."""
    from .test_errors import _expect_value_error

    _expect_value_error(build("stablelm", qk_layernorm=True), sf.ShardConfig(tp_size=2),
                        "no shardformer policy registered for model.config.model_type='stablelm'", "llama",
                        "register_policy", "model.model.layers.0", "self_attn.q_layernorm", "docs/policies.md")
    return "ok"


def _doc_example() -> str:
    text = DOC.read_text()
    block = text.split("<!-- worked example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def test_doc_example_is_short():
    lines = [line for line in _doc_example().splitlines() if line.strip()]
    assert len(lines) < 50, len(lines)


def check_doc_example() -> float:
    namespace = {}
    exec(_doc_example(), namespace)  # noqa: S102 - the documented policy, registered for "stablelm"
    try:
        assert sf.policies.get_policy(build("stablelm")).name == "StableLmPolicy"
        return _train_and_compare("stablelm", derived=False)
    finally:
        policy_base._REGISTRY.pop("stablelm", None)


def test_shard_model_falls_back_and_fails_on_every_rank(pools):
    assert pools(2).run(check_shard_model_raises_everywhere) == ["ok", "ok"]
    assert max(pools(2).run(check_doc_example)) <= TOL
