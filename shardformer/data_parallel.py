"""Gradient reduction across replicas, bucketed and overlapped with backward (as DDP does).

Every parameter is reduced over the ranks that hold a copy of it:
  * an ordinary parameter over the dp group (sum, then / dp: the DDP mean);
  * a parameter split with `replicas > 1` (KV heads replicated over tp) over its dp x replica
    group: the sum over replicas is the true gradient (each replica saw only its own query
    heads), the / dp makes it the data-parallel mean.
Parameters are packed into buckets of about `bucket_mb` in reverse registration order (roughly
the order gradients are produced); a bucket's all-reduce is launched asynchronously as soon as
its last gradient has been accumulated, and an end-of-backward callback waits for all of them.
Under `no_sync()` gradients just accumulate locally, as with DDP.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .layers.shard import sharded_parameters


@dataclass
class _Bucket:
    params: list
    group: object
    divisor: int
    ready: int = 0
    flat: torch.Tensor | None = None
    work: object = None


def _replica_groups(mesh: DeviceMesh, replicas: int):
    """This rank's group of dp x `replicas` consecutive-tp ranks (created on every rank)."""
    grid = mesh.mesh  # ranks, shape (dp, pp, sp, tp)
    dp, pp, sp, tp = grid.shape
    rank_lists = [
        grid[:, i, j, s * replicas:(s + 1) * replicas].flatten().tolist()
        for i in range(pp) for j in range(sp) for s in range(tp // replicas)
    ]
    group, _ = dist.new_subgroups_by_enumeration(rank_lists)
    return group


class GradReducer:
    """Reduces gradients over replicas (see module docstring). Does nothing when no parameter is
    replicated across ranks."""

    def __init__(self, model: torch.nn.Module, mesh: DeviceMesh, bucket_mb: float = 25.0):
        """Buckets of about `bucket_mb` MiB per (reduce group, dtype); hooks on every reduced param."""
        self.enabled = True
        self._queued = False
        # buckets launched while backward was still running vs at its end (overlap evidence)
        self.launches = {"during_backward": 0, "at_end": 0}
        dp = mesh.size(mesh.mesh_dim_names.index("dp"))
        dp_group = mesh.get_group("dp") if dp > 1 else None
        groups = {}
        by_group: dict = {}
        for _, param, spec in reversed(list(sharded_parameters(model))):
            if not param.requires_grad:
                continue
            replicas = spec.replicas if spec is not None else 1
            if replicas > 1 and replicas not in groups:
                groups[replicas] = _replica_groups(mesh, replicas)
            group = groups[replicas] if replicas > 1 else dp_group
            if group is not None:
                by_group.setdefault((id(group), param.dtype), (group, []))[1].append(param)
        cap = int(bucket_mb * 2**20)
        self.buckets: list[_Bucket] = []
        self._bucket_of = {}
        for group, params in by_group.values():
            current, size = [], 0
            for p in params:
                current.append(p)
                size += p.numel() * p.element_size()
                if size >= cap:
                    self._add_bucket(current, group, dp)
                    current, size = [], 0
            if current:
                self._add_bucket(current, group, dp)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for bucket in self.buckets for p in bucket.params]

    def remove(self):
        """Detach the gradient hooks (the gradients are then no longer reduced)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _add_bucket(self, params, group, dp):
        bucket = _Bucket(params, group, dp)
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[p] = bucket

    @property
    def active(self) -> bool:
        return bool(self.buckets)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the first backward after the block reduces them."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def _on_grad(self, param):
        if not self.enabled:
            return
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        bucket = self._bucket_of[param]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)
            self.launches["during_backward"] += 1

    def _launch(self, bucket: _Bucket):
        # one extra entry per parameter counts the ranks that had a gradient, so that every
        # replica makes the same choice between "None" and "the reduced gradient"
        had = [p.grad is not None for p in bucket.params]
        bucket.flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket.params
        ] + [torch.tensor(had, dtype=bucket.params[0].dtype, device=bucket.params[0].device)])
        bucket.work = dist.all_reduce(bucket.flat, group=bucket.group, async_op=True)

    def _finish(self):
        """End of backward: launch buckets with unused parameters, wait, write the means back."""
        for bucket in self.buckets:
            if bucket.work is None:
                self._launch(bucket)
                self.launches["at_end"] += 1
        for bucket in self.buckets:
            bucket.work.wait()
            n = len(bucket.params)
            anyone_had = bucket.flat[-n:].tolist()
            bucket.flat.div_(bucket.divisor)
            offset = 0
            for p, had_somewhere in zip(bucket.params, anyone_had):
                reduced = bucket.flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is not None:
                    p.grad.copy_(reduced)
                elif had_somewhere:
                    p.grad = reduced.clone()
            bucket.ready, bucket.flat, bucket.work = 0, None, None
        self._queued = False
