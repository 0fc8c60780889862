"""Norms over features split over tp (`Policy.split_norms`): OLMo 2 / OLMo 3 / OLMoE normalise
the whole query and key projections (all heads together). Each against the unsharded model (loss,
every gradient, every weight after AdamW; fp32, 1e-5 relative); their sequence-parallel modes and
pipelines run in `test_families.py`'s tables."""
import dataclasses

import pytest
import torch
from torch import nn

from .test_equivalence import TOL, check_equivalence
from .test_families import AUX, check_packed_checkpoint, check_packed_load_zero3, check_refused, check_refused_with
from .test_pipeline import check_pipeline


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
        (None, nn.LayerNorm(64), r"q_norm \(LayerNorm\) is not an RMSNorm with one 1-D `weight`"),
        (None, _GemmaNorm(64), r"q_norm \(_GemmaNorm\) does not compute weight \* x / sqrt\(mean\(x\^2\) \+ eps\)"),
    ]
    for norms, module, pattern in cases:
        model = build("olmo2")
        if module is not None:
            model.model.layers[1].self_attn.q_norm = module
        with pytest.raises(ValueError, match=pattern):
            plan_tensor_parallel(model, dataclasses.replace(policy, split_norms=norms or policy.split_norms), 2)
