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
others waiting in a collective. `ShardConfig(check_batch=False)` turns the fingerprint
comparison off; `forward_backward` still shares its validation (one tiny all-gather).
Inside `torch.compile` the comparison is a device-side assert (no host sync, no graph break):
a mismatch raises RuntimeError there (on CUDA, a device-side assert that ends the process)
instead of the ValueError of eager mode.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from .comm import _all_gather_dim0, comm_device, raise_if_failed

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


def _items(args: tuple, kwargs: dict) -> list:
    return [(f"arg{i}", v) for i, v in enumerate(args)] + [(k, kwargs[k]) for k in sorted(kwargs)]


def fingerprint(args: tuple, kwargs: dict, device, content: bool = True) -> torch.Tensor:
    """int64 [2] on `device`: a structure number from every argument's name, dtype and shape
    (values of plain arguments; only the type of other objects: caches differ between peers by
    design), and a content sum of every tensor (0 with `content=False`: the shards of
    `sf.split_batch` differ between peers by design)."""
    structure = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    for key, value in _items(args, kwargs):
        key_code = _crc(key) | 1
        if torch.is_tensor(value):
            shape = torch.tensor([_crc(str(value.dtype)), *value.shape], dtype=torch.int64, device=device)
            weights = torch.arange(1, shape.numel() + 1, dtype=torch.int64, device=device).mul_(1000003)
            structure = structure + (shape * weights).sum() * key_code
            if content:
                total = total + _bits_sum(value).to(device) * key_code
        else:
            code = _crc(repr(value)) if isinstance(value, _PLAIN) else _crc(type(value).__name__)
            structure = structure + key_code * (code + 1)
    return torch.stack([structure, total])


def describe(args: tuple, kwargs: dict) -> str:
    """A readable summary of a batch (names, dtypes, shapes, plain values) for error messages."""
    parts = []
    for key, value in _items(args, kwargs):
        if torch.is_tensor(value):
            parts.append(f"{key}:{str(value.dtype).replace('torch.', '')}{list(value.shape)}")
        else:
            parts.append(f"{key}={value!r}" if isinstance(value, _PLAIN) else f"{key}:{type(value).__name__}")
    return ", ".join(parts)


def _mismatch_message(rows, description: str, what: str) -> str:
    return (f"{what}: the ranks of one model replica (its tensor/sequence/pipeline-parallel peers, "
            f"global ranks {rows}) received different batches (this rank: {description}). Every rank "
            "of a replica must pass the same batch (or every rank its sf.split_batch shard of it); "
            "only data-parallel ranks take different ones "
            "(sample over the dp ranks: DistributedSampler(num_replicas=model.sf_mesh['dp'].size(), "
            "rank=model.sf_mesh.get_local_rank('dp'))). Once trusted, ShardConfig(check_batch=False) "
            "turns this check off.")


def _check_compiled(groups, args: tuple, kwargs: dict, what: str) -> None:
    """Traced variant over the replica group: no host sync, a device-side assert."""
    group = groups.replica
    mine = fingerprint(args, kwargs, comm_device(group))
    table = fc.wait_tensor(_all_gather_dim0(mine, 0, group)).view(-1, 2)
    torch._assert_async((table == table[:1]).all(),
                        _mismatch_message(groups.replica_ranks, "see the eager-mode error for shapes", what))


def check_batch(groups, args: tuple, kwargs: dict, group=None, error: BaseException | None = None,
                flags: torch.Tensor | None = None, what: str = "forward", compare: bool = True,
                content: bool = True) -> torch.Tensor:
    """Compare the batch fingerprints of every replica's ranks over `group` (None: the replica
    group; `dist.group.WORLD` for a whole step) in one all-gather; `compare=False` exchanges only
    `error` and `flags`; `content=False` compares the structure only (names, dtypes, shapes).
    `error`: this rank's own validation failure, shared so that every rank
    raises; `flags`: int64 [k] device-side checks (1 = bad), returned summed over `group` (on the
    CPU). Raises ValueError on every rank of `group` when a replica's batches differ."""
    group = groups.replica if group is None else group
    if dist.get_world_size(group) == 1 and flags is None:
        if error is not None:
            raise error
        return torch.zeros(0, dtype=torch.int64)
    if torch.compiler.is_compiling():
        if group is not groups.replica or error is not None or flags is not None:
            raise ValueError("check_batch under torch.compile checks the replica group's fingerprints only")
        _check_compiled(groups, args, kwargs, what)
        return torch.zeros(0, dtype=torch.int64)
    device = comm_device(group)
    fp = fingerprint(args, kwargs, device, content) if compare else torch.zeros(2, dtype=torch.int64, device=device)
    extra = torch.zeros(0, dtype=torch.int64, device=device) if flags is None else flags.to(device, torch.int64)
    mine = torch.cat([torch.tensor([0 if error is None else 1], device=device), fp, extra])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()
    raise_if_failed(any(row[0] for row in table), error, group, what)
    ranks = dist.get_process_group_ranks(group)
    by_rank = {rank: row[1:3] for rank, row in zip(ranks, table)}
    for replica in groups.replica_rows:
        prints = [by_rank[r] for r in replica if r in by_rank]
        if any(p != prints[0] for p in prints):
            raise ValueError(_mismatch_message(replica, describe(args, kwargs), what))
    return torch.tensor([sum(col) for col in zip(*[row[3:] for row in table])], dtype=torch.int64)
