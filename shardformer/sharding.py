"""How every parameter is laid out over the ranks: the one place that knows.

A `ShardSpec` describes one parameter of a sharded model. One dimension of size `full` is cut
into `shards` equal pieces after zero padding to a multiple of `shards`; `replicas` consecutive
ranks of the tp group hold the same piece. Hence ``shards * replicas`` is the tp size and rank r
holds piece ``r // replicas``. A parameter that tensor parallelism does not split is
`ShardSpec.replicated(tp)`: one piece, held by every tp rank.

A packed tensor (`parts`: Phi-3's fused q/k/v or gate/up rows, GPT-2's fused `c_attn` columns)
holds several parts one after another along `dim`; each part is cut into `shards` pieces on its
own and rank r's piece is its piece of every part, in order. So a fused projection's local
output still holds its own queries, keys and values (or gate and up rows) in HF's order, and
HF's forward, which slices or chunks that output, runs on the local piece unchanged. Packed
parts take no padding and no replicas (the tensor-parallel plan refuses a layout that needs them).

`partial` says whether the gradient of one copy is only part of the true gradient: the true
gradient is the sum over the `replicas` copies (KV heads replicated over tp: each copy sees only
its own query heads). A replicated norm weight under plain tp is not partial (every rank
computes its full gradient). Across data-parallel ranks every parameter is a full replica.

Everything that depends on a layout asks this module: the gradient reducer (which copies to
sum, which to average), gradient clipping (count each entry once), checkpoints (merge pieces,
drop padding and replicas) and the tensor-parallel layers (split on construction).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import gather_from_group


def padded_size(full: int, shards: int) -> int:
    """Smallest multiple of `shards` that is >= `full`."""
    return -(-full // shards) * shards


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is split: along `dim`, unpadded size `full`, into `shards` pieces, each
    held by `replicas` consecutive tp ranks; `partial`: each copy's gradient is a partial sum;
    `stage_copies`: how many pipeline stages hold the same tensor (their gradients are summed
    so the copies stay equal; clipping and checkpoints count it once); `parts`: the sizes of the
    parts packed along `dim` (summing to `full`), each split on its own (see module docstring)."""

    dim: int
    full: int
    shards: int
    replicas: int = 1
    partial: bool = False
    stage_copies: int = 1  # pipeline stages holding an identical copy (tied embedding and LM head)
    parts: tuple[int, ...] = ()

    def __post_init__(self):
        if self.parts and (sum(self.parts) != self.full or any(p % self.shards for p in self.parts)
                           or self.replicas != 1):
            raise ValueError(f"ShardSpec: packed parts {self.parts} must sum to full={self.full}, each divisible "
                             f"by shards={self.shards}, without replicas (got replicas={self.replicas})")

    @classmethod
    def replicated(cls, tp: int) -> "ShardSpec":
        """A parameter held whole by each of the `tp` ranks, its gradient complete on each."""
        return cls(0, 0, 1, tp)

    @property
    def split(self) -> bool:
        return self.shards > 1

    @property
    def local(self) -> int:
        """Size along `dim` of one piece (padding included)."""
        return padded_size(self.full, self.shards) // self.shards

    @property
    def padding(self) -> int:
        return padded_size(self.full, self.shards) - self.full

    def piece(self, tp_rank: int) -> int:
        return tp_rank // self.replicas

    def start(self, tp_rank: int) -> int:
        """First index (in the unsharded dimension) held by `tp_rank` (a packed piece is not
        contiguous there: see `runs`)."""
        return self.piece(tp_rank) * self.local

    def valid(self, tp_rank: int) -> int:
        """How many of this rank's `local` entries are real (not padding)."""
        return max(0, min(self.local, self.full - self.start(tp_rank)))

    def runs(self, tp_rank: int, first: int = 0, length: int | None = None) -> list[tuple[int, int, int]]:
        """Where entries [first, first + length) of `tp_rank`'s piece (along `dim`) come from:
        (offset from `first`, index in the unsharded dimension, count) per contiguous run of real
        entries (padding has none). One run for a plain split, one per part for a packed one."""
        end = self.local if length is None else min(first + length, self.local)
        if not self.split:
            return [(0, first, end - first)] if end > first else []
        if not self.parts:
            start, stop = self.start(tp_rank), min(end, self.valid(tp_rank))
            return [(0, start + first, stop - first)] if stop > first else []
        found, offset_full, offset_local = [], 0, 0
        for size in self.parts:
            width = size // self.shards
            lo, hi = max(first, offset_local), min(end, offset_local + width)
            if hi > lo:
                found.append((lo - first, offset_full + self.piece(tp_rank) * width + lo - offset_local, hi - lo))
            offset_full, offset_local = offset_full + size, offset_local + width
        return found


def split_tensor(full: torch.Tensor, spec: ShardSpec, tp_rank: int) -> torch.Tensor:
    """This rank's piece of `full` along `spec.dim`, zero-padded to `spec.local` (for a packed
    tensor, its piece of every part, concatenated)."""
    if not spec.split:
        return full.clone()
    if spec.parts:
        return torch.cat([full.narrow(spec.dim, start, n) for _, start, n in spec.runs(tp_rank)], dim=spec.dim)
    start, valid = spec.start(tp_rank), spec.valid(tp_rank)
    if valid == spec.local:
        return full.narrow(spec.dim, start, valid).clone()
    shape = list(full.shape)
    shape[spec.dim] = spec.local
    out = full.new_zeros(shape)
    if valid:  # a rank can hold padding only (e.g. 9 rows over 8 ranks: 2 per rank)
        out.narrow(spec.dim, 0, valid).copy_(full.narrow(spec.dim, start, valid))
    return out


def split_parameter(param: torch.nn.Parameter | None, spec: ShardSpec, tp_rank: int):
    """This rank's piece of `param` as a new Parameter (same requires_grad); None stays None."""
    if param is None:
        return None
    return torch.nn.Parameter(split_tensor(param.detach(), spec, tp_rank), requires_grad=param.requires_grad)


def merge_pieces(pieces: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """Inverse of `split_tensor`: `pieces` are the tensors of all tp ranks in rank order
    (replicas included); returns the unpadded full tensor."""
    if not spec.split:
        return pieces[0]
    distinct = pieces[:: spec.replicas]
    if spec.parts:  # each piece holds its share of every part: regroup part by part
        widths = [size // spec.shards for size in spec.parts]
        split = [piece.split(widths, dim=spec.dim) for piece in distinct]
        return torch.cat([p[i] for i in range(len(widths)) for p in split], dim=spec.dim).contiguous()
    return torch.cat(distinct, dim=spec.dim).narrow(spec.dim, 0, spec.full).contiguous()


@torch.no_grad()
def gather_full(tensor: torch.Tensor, spec: ShardSpec, tp_group) -> torch.Tensor:
    """The unsharded tensor from this rank's piece (a collective over the tp group when split)."""
    if not spec.split:
        return tensor.detach()
    stacked = gather_from_group(tensor.detach().contiguous(), 0, tp_group)
    return merge_pieces(list(stacked.chunk(dist.get_world_size(tp_group), dim=0)), spec)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (ZeRO-3's FSDP parameters and gradients over dp); a plain
    tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor over dp of a DTensor (a collective over dp); a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def record_specs(module: torch.nn.Module, **specs: ShardSpec) -> None:
    """Attach the layout of `module`'s own parameters (by attribute name); parallel layers call
    it on construction."""
    module.sf_shard_specs = {**getattr(module, "sf_shard_specs", {}), **specs}


def sharded_parameters(model: torch.nn.Module):
    """Yield (qualified name, parameter, ShardSpec) for every parameter of a sharded `model`,
    once each (a tied parameter under its first name). Parameters no parallel layer recorded are
    `ShardSpec.replicated(tp)`."""
    tp = model.sf_mesh["tp"].size() if hasattr(model, "sf_mesh") else 1
    specs = {}
    for module in model.modules():
        for pname, spec in getattr(module, "sf_shard_specs", {}).items():
            specs[id(getattr(module, pname))] = spec
    default = ShardSpec.replicated(tp)
    for name, param in model.named_parameters():
        yield name, param, specs.get(id(param), default)
