"""Split / pad / gather arithmetic shared by every parallel layer, and the metadata it records.

A parameter dimension of size `full` is cut into `shards` equal pieces after zero padding to a
multiple of `shards`; `replicas` consecutive tensor-parallel ranks hold the same piece (this is how
KV heads are replicated when tp exceeds their number). Hence the tp group has
``shards * replicas`` ranks and rank r holds piece ``r // replicas``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def padded_size(full: int, shards: int) -> int:
    """Smallest multiple of `shards` that is >= `full`."""
    return -(-full // shards) * shards


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter was split: along `dim`, unpadded size `full`, into `shards` pieces,
    each held by `replicas` consecutive tp ranks."""

    dim: int
    full: int
    shards: int
    replicas: int = 1

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
    distinct = pieces[:: spec.replicas]
    return torch.cat(distinct, dim=spec.dim).narrow(spec.dim, 0, spec.full).contiguous()


def sharded_parameters(model: torch.nn.Module):
    """Yield (qualified name, parameter, ShardSpec or None) for every parameter of `model`, once
    each (a tied parameter under its first name)."""
    specs = {}
    for module in model.modules():
        for pname, spec in getattr(module, "sf_shard_specs", {}).items():
            specs[id(getattr(module, pname))] = spec
    for name, param in model.named_parameters():
        yield name, param, specs.get(id(param))
