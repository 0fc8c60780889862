"""Norms over features split over tp (`Policy.split_norms`): OLMo 2 / OLMo 3 / OLMoE normalise
the whole query and key projections (all heads together). Each against the unsharded model (loss,
every gradient, every weight after AdamW; fp32, 1e-5 relative); their sequence-parallel modes and
pipelines run in `test_families.py`'s tables."""
import dataclasses

import pytest
import torch
from torch import nn

import shardformer as sf

from .test_equivalence import TOL, check_equivalence
from .test_families import AUX, check_packed_checkpoint, check_packed_load_zero3, check_refused, check_refused_with
from .test_pipeline import check_pipeline
from .test_zero import check_zero


@pytest.mark.parametrize("family,tp,tied,overrides", [
    ("olmo2", 2, False, {}), ("olmo2", 2, True, {}), ("olmo2", 4, False, {}), ("olmo3", 2, False, {}),
    ("olmoe", 2, False, AUX), ("olmoe", 4, False, {})])
def test_tensor_parallel(pools, family, tp, tied, overrides):
    """tp 2 (tied and untied; OLMoE with the router aux loss on) and tp 4, where the 2 KV heads are
    replicated: k_norm's sum of squares then counts each replica once."""
    assert max(pools(tp).run(check_equivalence, family, tp, tied, **overrides)) <= TOL


def test_split_gather_with_checkpointing(pools):
    """split_gather at tp 2 over 11 tokens, gradient checkpointing on, two AdamW steps: the gather at
    the attention's and the MLP's input runs again in the recomputation."""
    assert max(pools(2).run(check_equivalence, "olmo2", 2, False, 2, True, 1, True, "split_gather", 11)) <= TOL


def test_pipeline_with_tp_and_split_gather(pools):
    """pp 2 x tp 2 with split_gather: OLMo 2's post-norm layers hand q / k / v the layer's own
    input, which split_gather gathers at the attention's and the MLP's input."""
    assert max(pools(4).run(check_pipeline, 2, "1f1b", 2, False, tp=2, family="olmo2", sp_mode="split_gather")) <= TOL


@pytest.mark.parametrize("mode", ["all_to_all", "ring"])
def test_sequence_axis_with_tp(pools, mode):
    """sp 2 x tp 2 on the sp axis: the norms see this rank's sequence chunk and heads, their sum of
    squares all-reduced over tp only; 11 tokens (padded to the split)."""
    assert max(pools(4).run(check_equivalence, "olmo2", 2, False, sp=2, sp_mode=mode, seq=11)) <= TOL


@pytest.mark.parametrize("stage", [2, 3])
def test_zero(pools, stage):
    """tp 2 x dp 2 with ZeRO-2 and ZeRO-3 (FSDP2 over the split norm weights' tp pieces), two AdamW
    steps with clipping, tied."""
    assert max(pools(4).run(check_zero, stage, tp=2, family="olmo2", steps=2)) <= TOL


def test_checkpoints(pools, tmp_path):
    """Saved at tp 2 -> plain HF tensors (the norm weights merged); loaded at tp 2 and at tp 2 x
    ZeRO-3 (dp 2); init_model equal at tp 1 and 2."""
    directory = str(tmp_path / "ckpt")
    assert max(pools(2).run(check_packed_checkpoint, directory, "olmo2", False)) <= TOL
    assert max(pools(4).run(check_packed_load_zero3, directory, "olmo2")) <= TOL


def test_refusals(pools):
    """OLMo 3's sliding windows refuse ring attention; OLMoE's experts refuse split_gather."""
    for message in pools(2).run(check_refused, "olmo3", sp_size=2, sp_mode="ring"):
        assert "sliding" in message, message
    for message in pools(2).run(check_refused, "olmoe", tp_size=2, sp_mode="split_gather"):
        assert "sp_mode='split_gather'" in message and "OlmoePolicy.experts" in message, message
    for message in pools(2).run(check_refused_with, "olmoe", AUX, pp_size=2):
        assert "output_router_logits=True" in message and "OlmoePolicy.loss_terms" in message, message


class _GemmaNorm(nn.Module):
    """An RMSNorm of another formula (scales by 1 + weight)."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(n)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class _OtherEps(_GemmaNorm):
    """An RMSNorm whose formula adds 1e-5, not its `eps` attribute (1e-6): seen only on small inputs."""

    def forward(self, x):
        return self.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


class _Float32Out(_GemmaNorm):
    """An RMSNorm that returns fp32 for a bf16 input: a split norm returning x's dtype would change the model."""

    def forward(self, x):
        return self.weight.float() * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps))


class _Raises(_GemmaNorm):
    def forward(self, x):
        if x.dim() == 2:
            raise RuntimeError("no 2-D inputs")
        return super().forward(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_rms_norm_is_hf_norms_bit_for_bit(dtype):
    """On one rank `split_rms_norm` with the order `rms_norm_form` finds equals HF's RMSNorms exactly
    in bf16 and fp16: OLMo 2 multiplies by the weight in fp32 and casts after (found: after),
    OLMoE and LLaMA cast before the weight (found: before)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    from shardformer.tensor_parallel.norm import rms_norm_form, split_rms_norm

    gen = torch.Generator().manual_seed(1)
    for cls, before in ((Olmo2RMSNorm, False), (OlmoeRMSNorm, True), (LlamaRMSNorm, True)):
        for n in (16, 64, 96):
            norm = cls(n, eps=1e-6)
            assert rms_norm_form(norm, "norm") == (1e-6, before), (cls, n)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(n, generator=gen) + 1.0)
            norm = norm.to(dtype)
            x = (torch.randn(4, 7, n, generator=gen) * 2.0).to(dtype)
            got = split_rms_norm(x, norm.weight, 1e-6, n, lambda s: s, before)
            assert got.dtype == dtype and torch.equal(got, norm(x)), (cls, n, dtype)


def test_plan_errors():
    """The plan (no process group) checks each split norm: it names a column linear of the right
    width, and the module computes weight * x / sqrt(mean(x^2) + eps) (run on a random input)."""
    from shardformer.policies import Olmo2Policy
    from shardformer.tensor_parallel import plan_tensor_parallel

    from .models import build

    policy = Olmo2Policy()
    plan = plan_tensor_parallel(build("olmo2"), policy, 4)  # 2 KV heads over 4 ranks: 2 replicas each
    spec, (eps, before) = plan.split_norms["model.layers.0.self_attn.k_norm"]
    assert (spec.full, spec.shards, spec.replicas, spec.partial) == (16, 2, 2, True) and eps == 1e-5 and not before
    cases = [
        ({"self_attn.q_norm": "self_attn.o_proj"}, None, r"split_norms=.*names self_attn.o_proj, not a column_parallel"),
        ({"self_attn.k_norm": "self_attn.q_proj"}, None, r"normalises \(16,\) features .*q_proj has 64 outputs"),
        (None, nn.LayerNorm(64), r"Olmo2Policy\.split_norms=\{'self_attn\.q_norm': 'self_attn\.q_proj'\} "
                                 r"model\.model\.layers\.1\.self_attn\.q_norm \(LayerNorm\) is not an RMSNorm"),
        (None, _GemmaNorm(64), r"Olmo2Policy\.split_norms=.*\.q_norm \(_GemmaNorm\) does not compute weight \* x / "
                               r"sqrt\(mean\(x\^2\) \+ eps\)"),
        (None, _OtherEps(64), r"Olmo2Policy\.split_norms=.*\.q_norm \(_OtherEps\) does not compute"),
        (None, _Float32Out(64), r"Olmo2Policy\.split_norms=.*\.q_norm \(_Float32Out\) does not compute .* in x's dtype"),
        (None, _Raises(64), r"Olmo2Policy\.split_norms=.*\.q_norm \(_Raises\) does not compute .*raised RuntimeError: "
                            r"no 2-D inputs"),
    ]
    for norms, module, pattern in cases:
        model = build("olmo2")
        if module is not None:
            model.model.layers[1].self_attn.q_norm = module
        with pytest.raises(ValueError, match=pattern):
            plan_tensor_parallel(model, dataclasses.replace(policy, split_norms=norms or policy.split_norms), 2)


def test_split_gather_refuses_inputs_it_cannot_gather():
    """split_gather gathers at the holding module the input of column linears no `tp_input_copies`
    producer hands theirs: refused at setup, naming the linear, when that module is the decoder
    layer itself, when the producer hands the module's other linears theirs (a partial list), and
    when another such module sits inside it (the sequence would be gathered twice)."""
    from shardformer.plan import plan_layout
    from shardformer.policies import LlamaPolicy

    from .models import build

    config = sf.ShardConfig(tp_size=2, sp_mode="split_gather")
    llama = LlamaPolicy()
    copies = dict(llama.tp_input_copies)
    plan_layout(build("llama"), llama, config, 2)  # as registered: accepted
    partial = dict(copies, input_layernorm=("self_attn.q_proj", "self_attn.k_proj"))
    with pytest.raises(ValueError, match=r"LlamaPolicy\.tp_input_copies=.* does not hand model\.model\.layers\.0\."
                                         r"self_attn\.v_proj its input: it hands model\.model\.layers\.0\.self_attn"
                                         r"\.k_proj, model\.model\.layers\.0\.self_attn\.q_proj in the same module"):
        plan_layout(build("llama"), dataclasses.replace(llama, tp_input_copies=partial), config, 2)

    model = build("llama")
    for layer in model.model.layers:
        layer.extra = nn.Linear(64, 64)
    direct = dataclasses.replace(llama, column_parallel=llama.column_parallel + ("extra",))
    with pytest.raises(ValueError, match=r"LlamaPolicy\.tp_input_copies=.* does not hand model\.model\.layers\.0\.extra "
                                         r"its input: it sits directly in its decoder layer"):
        plan_layout(model, direct, config, 2)

    model = build("llama")
    for layer in model.model.layers:
        layer.self_attn.inner = nn.Sequential(nn.Linear(64, 64))
    nested = dataclasses.replace(llama, column_parallel=llama.column_parallel + ("self_attn.inner.0",),
                                 tp_input_copies={k: v for k, v in copies.items() if k != "input_layernorm"})
    with pytest.raises(ValueError, match=r"does not hand model\.model\.layers\.0\.self_attn\.q_proj its input: neither "
                                         r"does it hand the linears in model\.model\.layers\.0\.self_attn\.inner, inside "
                                         r"model\.model\.layers\.0\.self_attn, theirs; .* gather the sequence twice"):
        plan_layout(model, nested, config, 2)
