"""How every parameter is laid out over the ranks: the one place that knows.

A `ShardSpec` describes one parameter of a sharded model. One dimension of size `full` is cut
into `shards` equal pieces after zero padding to a multiple of `shards`; `replicas` consecutive
ranks of the tp group hold the same piece. Hence ``shards * replicas`` is the tp size and rank r
holds piece ``r // replicas``. A parameter that tensor parallelism does not split is
`ShardSpec.replicated(tp)`: one piece, held by every tp rank.

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
    so the copies stay equal; clipping and checkpoints count it once)."""

    dim: int
    full: int
    shards: int
    replicas: int = 1
    partial: bool = False
    stage_copies: int = 1  # pipeline stages holding an identical copy (tied embedding and LM head)

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
        """First index (in the unsharded dimension) held by `tp_rank`."""
        return self.piece(tp_rank) * self.local

    def valid(self, tp_rank: int) -> int:
        """How many of this rank's `local` entries are real (not padding)."""
        return max(0, min(self.local, self.full - self.start(tp_rank)))


def split_tensor(full: torch.Tensor, spec: ShardSpec, tp_rank: int) -> torch.Tensor:
    """This rank's piece of `full` along `spec.dim`, zero-padded to `spec.local`."""
    if not spec.split:
        return full.clone()
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
