"""RMSNorm over features that are split over the tp group (`Policy.split_norms`).

OLMo 2's `q_norm` / `k_norm` normalise the whole output of the query / key projection (all heads
together), while under tensor parallelism each rank holds only its own heads' features:

    y = weight * x / sqrt(mean(x^2 over all N features) + eps)      (in fp32, cast back to x's dtype)

`x` and `weight` are split along the last dimension as the column-parallel linear that feeds the
norm splits its outputs (`ShardSpec`, KV replicas included).
    forward: all-reduce (sum) over the tp group of each row's local sum of squares
    backward: all-reduce (sum) of that sum's gradient (every rank's output depends on every rank's
              features), then the local chain rule; `weight`'s gradient is this rank's piece
With `replicas` > 1 (KV heads replicated over tp) each piece is held by `replicas` ranks, so the
reduced sum counts every feature `replicas` times and is divided by it (each copy's gradient is
then partial, summed over the copies by the reducer like the KV projection's).

Which norms qualify is decided at setup by running the HF module itself (`rms_norm_form`): no HF
forward is copied blindly, a module of another formula is refused with its name.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..comm import copy_to_group, reduce_from_group
from ..sharding import ShardSpec, record_specs, split_parameter

_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def split_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, features: int, total,
                   cast_before_weight: bool) -> torch.Tensor:
    """The norm of rank-local `x` ([..., n]) over `features` split features; `total(s)` sums the
    ranks' sums of squares `s` (forward and backward: see the module docstring)."""
    dtype = x.dtype
    h = x.float()
    variance = total(h.pow(2).sum(-1, keepdim=True)) / features
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype) if cast_before_weight else (weight * h).to(dtype)


def rms_norm_form(norm: nn.Module, where: str) -> tuple[float, bool]:
    """(eps, cast_before_weight) of an HF RMSNorm module, checked by running a copy of it (on the
    CPU, fresh random weight, so a meta-device module works too) against `split_rms_norm` on one
    rank: in fp32 within 1e-6 on inputs of two scales (one so small that eps dominates: a wrong
    eps shows); in bf16 the order of casting back (before or after the weight) whose result is
    within one bf16 step of the module's, and the module's output dtype must be its input's.
    A module of another formula (Gemma's `1 + weight`, a bias, a learned eps), or one that fails
    on the probe, is a ValueError naming `where`."""
    weight = getattr(norm, "weight", None)
    eps = next((getattr(norm, a) for a in _EPS_ATTRS if isinstance(getattr(norm, a, None), float)), None)
    params = dict(norm.named_parameters())
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or set(params) != {"weight"} or eps is None:
        raise ValueError(f"model.{where} ({type(norm).__name__}) is not an RMSNorm with one 1-D `weight` and a float "
                         f"`{'` / `'.join(_EPS_ATTRS)}` attribute; it normalises over features split over tp")
    refused = (f"model.{where} ({type(norm).__name__}) does not compute weight * x / sqrt(mean(x^2) + eps) over "
               f"its last dim (eps = {eps}) in x's dtype, checked on random inputs; a norm over features split over "
               "tp must, to be computed from every rank's sum of squares")
    try:
        found = _cast_order(norm, eps, weight.shape[0])
    except Exception as err:  # the module cannot run as a plain RMSNorm on a [rows, features] input
        raise ValueError(f"{refused} (running it raised {type(err).__name__}: {err})") from None
    if found is None:
        raise ValueError(refused)
    return eps, found


@torch.no_grad()
def _cast_order(norm: nn.Module, eps: float, n: int) -> bool | None:
    """Whether `norm` casts back to x's dtype before the weight (True), after (False), or neither
    matches `split_rms_norm` (None)."""
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    gen = torch.Generator().manual_seed(0)
    probe.weight.copy_(torch.randn(n, generator=gen) + 1.0)
    x = torch.randn(3, n, generator=gen)
    for scale in (3.0, max(eps, 1e-12) ** 0.5):  # the second: mean(x^2) about eps
        expected = probe(x * scale)
        got = split_rms_norm(x * scale, probe.weight, eps, n, lambda s: s, False)
        if expected.dtype != torch.float32 or (expected - got).abs().max() > 1e-6 * expected.abs().max():
            return None
    probe, xb = probe.to(torch.bfloat16), (x * 3.0).to(torch.bfloat16)
    expected = probe(xb)
    if expected.dtype != torch.bfloat16:
        return None
    step = expected.float().abs() * 2.0 ** -7 + 1e-30  # one bf16 step (8 significant bits)
    scores = {}
    for before in (True, False):  # the order more of whose elements equal the module's, within a step
        got = split_rms_norm(xb, probe.weight, eps, n, lambda s: s, before)
        if ((got.float() - expected.float()).abs() <= step).all():
            scores[before] = (got == expected).sum().item()
    return max(scores, key=scores.get) if scores else None


class SplitRMSNorm(nn.Module):
    """An RMSNorm whose features (last dim) are split over the tp group (see module docstring)."""

    def __init__(self, weight: nn.Parameter, spec: ShardSpec, eps: float, cast_before_weight: bool, group):
        super().__init__()
        self.weight, self.eps, self.cast_before_weight, self.group = weight, eps, cast_before_weight, group
        self.features, self.replicas = spec.full, spec.replicas
        record_specs(self, weight=spec)

    @classmethod
    def from_norm(cls, norm: nn.Module, spec: ShardSpec, form: tuple[float, bool], group, tp_rank: int):
        return cls(split_parameter(norm.weight, spec, tp_rank), spec, *form, group)

    def _total(self, s: torch.Tensor) -> torch.Tensor:
        s = copy_to_group(reduce_from_group(s, self.group), self.group)
        return s / self.replicas if self.replicas > 1 else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_rms_norm(x, self.weight, self.eps, self.features, self._total, self.cast_before_weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.features} features, eps={self.eps}"
