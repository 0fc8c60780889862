"""Every rank of one model replica must receive the same batch; this module checks it, cheaply.

Tensor-, sequence- and pipeline-parallel peers (the ranks of one replica) compute one model
together: if they were fed different batches (a per-rank seed, or a `DistributedSampler` over the
whole world instead of over the dp ranks) each would run its shard on its own data and the model
would train, silently, on a mix. Before a call, each rank reduces its batch to a fingerprint
(a CRC of every argument's name, dtype and shape, and a position-weighted integer sum of every
tensor's bits: two int64 numbers) and the fingerprints are exchanged in one small all-gather.

`check_batch` runs in the sharded model's forward over the replica group; `forward_backward`
runs it over the whole world instead, together with its own input validation, so that a bad
batch on any rank (of any replica) stops every rank with the same error instead of leaving the
others waiting in a collective. Inside `torch.compile` the comparison is a device-side assert
(no host sync, no graph break). Turn it off with `ShardConfig(check_batch=False)`.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from .comm import comm_device, raise_if_failed

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PLAIN = (str, int, float, bool, type(None))


def _bits_sum(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted int64 sum of the tensor's bits (0-d, on the tensor's device)."""
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.is_floating_point():
        x = x.contiguous().view(_INT_OF_SIZE[x.element_size()])
    x = x.reshape(-1).to(torch.int64)
    weights = torch.arange(x.numel(), device=x.device, dtype=torch.int64).mul_(2654435761).add_(97)
    return (x * weights.remainder_(2147483647)).sum()


@torch.compiler.assume_constant_result
def _crc(text: str) -> int:
    """CRC-32 of a string (process-independent, unlike hash(); a constant under torch.compile)."""
    return zlib.crc32(text.encode())


def fingerprint(args: tuple, kwargs: dict, device) -> tuple[torch.Tensor, str]:
    """(int64 [2] on `device`: a structure number from every argument's name, dtype and shape,
    and a content sum; a readable description of the batch)."""
    items = [(f"arg{i}", v) for i, v in enumerate(args)] + [(k, kwargs[k]) for k in sorted(kwargs)]
    parts, structure = [], 0
    content = torch.zeros((), dtype=torch.int64, device=device)
    for key, value in items:
        key_code = _crc(key) | 1
        if torch.is_tensor(value):
            shape = list(value.shape)
            parts.append(f"{key}:{str(value.dtype).replace('torch.', '')}{shape}")
            code = _crc(str(value.dtype)) + len(shape)
            for size in shape:
                code = (code * 1000003 + size) % 2147483647
            structure = (structure + key_code * code) % 9223372036854775783
            content = content + _bits_sum(value).to(device) * key_code
        elif isinstance(value, _PLAIN):
            parts.append(f"{key}={value!r}")
            structure = (structure + key_code * (_crc(repr(value)) + 1)) % 9223372036854775783
        else:  # caches and other objects differ between peers by design (local heads)
            parts.append(f"{key}:{type(value).__name__}")
            structure = (structure + key_code * _crc(type(value).__name__)) % 9223372036854775783
    fp = torch.stack([torch.tensor(structure, dtype=torch.int64, device=device), content])
    return fp, ", ".join(parts)


def _mismatch_message(rows, description: str, what: str) -> str:
    return (f"{what}: the ranks of one model replica (its tensor/sequence/pipeline-parallel peers, "
            f"global ranks {rows}) received different batches (this rank: {description}). Every rank "
            "of a replica must pass the same batch; only data-parallel ranks take different ones "
            "(sample over the dp ranks: DistributedSampler(num_replicas=model.sf_mesh['dp'].size(), "
            "rank=model.sf_mesh.get_local_rank('dp'))). Once trusted, ShardConfig(check_batch=False) "
            "turns this check off.")


def check_batch(groups, args: tuple, kwargs: dict, group=None, error: BaseException | None = None,
                flags: torch.Tensor | None = None, what: str = "forward") -> torch.Tensor:
    """Compare the batch fingerprints of every replica's ranks over `group` (None: the replica
    group; `dist.group.WORLD` for a whole step) in one all-gather. `error`: this rank's own
    validation failure, shared so that every rank raises; `flags`: int64 [k] device-side checks
    (1 = bad), returned summed over `group`. Raises ValueError on every rank of `group` when a
    replica's batches differ."""
    group = groups.replica if group is None else group
    if dist.get_world_size(group) == 1 and flags is None:
        if error is not None:
            raise error
        return torch.zeros(0, dtype=torch.int64)
    device = comm_device(group)
    fp, description = fingerprint(args, kwargs, device)
    extra = torch.zeros(0, dtype=torch.int64, device=device) if flags is None else flags.to(device, torch.int64)
    mine = torch.cat([torch.tensor([0 if error is None else 1], device=device), fp, extra])
    if torch.compiler.is_compiling():  # traced: no host sync, a device-side assert
        table = fc.wait_tensor(fc.all_gather_tensor(mine, 0, group)).view(-1, mine.numel())
        torch._assert_async((table[:, 1:3] == table[:1, 1:3]).all(), _mismatch_message(groups.replica_ranks,
                                                                                         description, what))
        return table[:, 3:].sum(0)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()
    raise_if_failed(any(row[0] for row in table), error, group, what)
    ranks = dist.get_process_group_ranks(group)
    by_rank = {rank: row[1:3] for rank, row in zip(ranks, table)}
    for replica in groups.replica_rows:
        prints = [by_rank[r] for r in replica if r in by_rank]
        if any(p != prints[0] for p in prints):
            raise ValueError(_mismatch_message(replica, description, what))
    return torch.tensor([sum(col) for col in zip(*[row[3:] for row in table])], dtype=torch.int64)
