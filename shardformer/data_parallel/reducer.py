"""Gradient reduction across the copies of each parameter, asking `sharding` how each is held.

Two reductions, with plain DDP semantics: every backward adds exactly its own reduced gradient
to `.grad`, with or without `no_sync()`, with or without `zero_grad()` in between.
  * Partial copies (`ShardSpec.partial`: KV heads replicated over tp, each copy seeing only its
    own query heads; split_gather's norm weights, each copy seeing only its tokens): the
    gradient of *this backward* is summed over the copies' group by a hook on the tensor, before
    it is accumulated into `.grad`. This is model-parallel math, so it runs under `no_sync()`
    too; summing `.grad` itself would count earlier backwards again. The hook goes on the tensor
    the owning module holds under the parameter's name, at setup and, at ZeRO-3, again before
    each of the module's forwards when that tensor is a new one (once per tensor: a checkpointed
    forward run again finds it hooked). So it also reaches the tensor autograd sees under ZeRO-3, where FSDP2
    swaps in its unsharded parameter (one object, kept across steps) for forward and backward.
  * Data parallelism: every parameter is averaged over the dp group (sum, then / dp), bucketed
    and overlapped with backward as DDP does; with sequence parallelism over the dp x sp group
    (`ParallelGroups.data`: gradients inside the sequence split arrive scaled by sp, so this mean
    is the sum over sp and the mean over dp). A mean of identical values is the value, so
    averaging the accumulated `.grad` adds exactly the mean of the new part.
Parameters are packed into buckets of about `bucket_mb` in reverse registration order (roughly
the order gradients are produced); buckets are launched asynchronously in that order, each as
soon as its own and every earlier bucket's gradients have been accumulated (the same collectives
in the same order on every rank, also when a parameter is unused on some), and an
end-of-backward callback launches the rest and waits for all of them.
Under `no_sync()` gradients accumulate locally (dp), as with DDP.
With ZeRO stage 2 (`scatter_to(sink)`) each bucket is reduce-scattered instead: every rank
receives the mean of only its own piece of each parameter's flat gradient (the pieces of
`zero.ShardLayout`), hands it to the sink and frees the full `.grad`.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from ..comm import reduce_scatter_into
from ..mesh import ParallelGroups
from ..sharding import sharded_parameters


@dataclass
class _Bucket:
    params: list
    group: object
    divisor: int
    ready: int = 0
    flat: torch.Tensor | None = None
    work: object = None


def _sum_over(group):
    """Tensor hook: this backward's gradient summed over `group` (before accumulation)."""

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


class GradReducer:
    """Reduces gradients over the copies of each parameter (see module docstring). Does nothing
    when no parameter has copies across ranks."""

    def __init__(self, model: torch.nn.Module, groups: ParallelGroups, bucket_mb: float = 25.0,
                 reduce_data: bool = True):
        """Sum hooks on partial parameters; dp buckets of about `bucket_mb` MiB per dtype (none
        with `reduce_data=False`: ZeRO-3's FSDP reduces over dp itself)."""
        self.enabled = True
        self._queued = False
        self._next = 0  # the next bucket to launch in this backward
        self._sink = None  # ZeRO-2: (param, this rank's reduced piece, had a gradient anywhere) -> None
        self._layout = None
        # buckets launched while backward was still running vs at its end (overlap evidence)
        self.launches = {"during_backward": 0, "at_end": 0}
        dp = groups.data_size if reduce_data else 1  # dp x sp
        by_dtype: dict = {}
        self._handles = []
        self._summed = WeakIdKeyDictionary()  # tensor -> handle of its sum hook
        self.trainable = {id(p) for p in model.parameters() if p.requires_grad}  # what the hooks cover
        self._watch_partial(model, groups, swapped=not reduce_data)
        for _, param, spec in reversed(list(sharded_parameters(model))):
            if param.requires_grad and dp > 1:
                by_dtype.setdefault(param.dtype, []).append(param)
        cap = int(bucket_mb * 2**20)
        self.buckets: list[_Bucket] = []
        self._bucket_of = {}
        group = groups.data
        for params in by_dtype.values():
            current, size = [], 0
            for p in params:
                current.append(p)
                size += p.numel() * p.element_size()
                if size >= cap:
                    self._add_bucket(current, group, dp)
                    current, size = [], 0
            if current:
                self._add_bucket(current, group, dp)
        self._handles += [p.register_post_accumulate_grad_hook(self._on_grad)
                          for bucket in self.buckets for p in bucket.params]

    def _watch_partial(self, model: torch.nn.Module, groups: ParallelGroups, swapped: bool) -> None:
        """Sum hooks for the partial parameters of every module (see module docstring); with
        `swapped` (ZeRO-3: FSDP2 swaps its unsharded parameters in) also before each forward.
        Otherwise the parameter stays the same tensor, and a forward pre-hook would only cost a
        graph break under torch.compile."""
        for module in model.modules():
            names = {name: groups.block(spec.replicas) for name, spec in getattr(module, "sf_shard_specs", {}).items()
                     if spec.partial and spec.replicas > 1 and getattr(module, name) is not None
                     and getattr(module, name).requires_grad}
            if names:
                self._hook_partial(module, names=names)
            if names and swapped:
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._hook_partial,
                                                                                        names=names)))

    def _hook_partial(self, module: torch.nn.Module, *_, names: dict) -> None:
        """Register the sum hook on each tensor `module` holds now under `names` (name -> group),
        once per tensor."""
        for name, group in names.items():
            tensor = getattr(module, name)
            if tensor.requires_grad and tensor not in self._summed:
                self._summed[tensor] = tensor.register_hook(_sum_over(group))

    def uncovered(self, model: torch.nn.Module) -> list[str]:
        """Names of parameters made trainable after this reducer was built (they would be neither
        reduced nor summed: `forward_backward` refuses them)."""
        return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in self.trainable]

    def scatter_to(self, layout, sink) -> None:
        """Reduce-scatter from now on: `layout.piece(param)` says which flat slice of each
        parameter this rank owns; `sink(param, piece_mean, had)` receives it."""
        self._layout, self._sink = layout, sink

    def remove(self):
        """Detach every gradient hook (the gradients are then no longer reduced)."""
        for handle in [*self._handles, *self._summed.values()]:
            handle.remove()
        self._handles, self._summed = [], WeakIdKeyDictionary()

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

    def reduce_now(self):
        """Reduce every bucket now (after a pipeline step, whose microbatches ran under
        `no_sync()`: the reduction runs once, after the last one)."""
        if self.buckets:
            self._finish()

    def _on_grad(self, param):
        if not self.enabled:
            return
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        bucket = self._bucket_of[param]
        bucket.ready += 1
        # buckets launch strictly in index order on every rank (as DDP's): a bucket whose last
        # gradient arrives early waits for the ones before it, so that ranks where a parameter
        # happens to be unused still issue the same collectives in the same order
        while self._next < len(self.buckets) and \
                self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1
            self.launches["during_backward"] += 1

    def _launch(self, bucket: _Bucket):
        # one extra entry per parameter counts the ranks that had a gradient, so that every
        # replica makes the same choice between "None" and "the reduced gradient"
        had = [p.grad is not None for p in bucket.params]
        first = bucket.params[0]
        flags = torch.tensor(had, dtype=first.dtype, device=first.device)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket.params]
        if self._sink is not None:  # ZeRO-2: rank r's segment = its piece of every parameter + the flags
            layout = self._layout
            padded = [layout.padded(g, p) for g, p in zip(grads, bucket.params)]  # once per parameter
            segments = [torch.cat([g[layout.slice_of(p, r)] for g, p in zip(padded, bucket.params)] + [flags])
                        for r in range(layout.size)]
            bucket.flat = torch.empty_like(segments[0])
            bucket.work = reduce_scatter_into(bucket.flat, torch.cat(segments), group=bucket.group,
                                                     async_op=True)
            return
        bucket.flat = torch.cat(grads + [flags])
        bucket.work = dist.all_reduce(bucket.flat, group=bucket.group, async_op=True)

    def _finish(self):
        """End of backward: launch buckets with unused parameters, wait, write the means back."""
        for bucket in self.buckets[self._next:]:  # in index order, after those launched already
            self._launch(bucket)
            self.launches["at_end"] += 1
        self._next = 0
        for bucket in self.buckets:
            bucket.work.wait()
            n = len(bucket.params)
            anyone_had = bucket.flat[-n:].tolist()
            bucket.flat.div_(bucket.divisor)
            offset = 0
            for p, had_somewhere in zip(bucket.params, anyone_had):
                size = self._layout.piece_size(p) if self._sink is not None else p.numel()
                reduced = bucket.flat[offset:offset + size]
                offset += size
                if self._sink is not None:
                    p.grad = None  # the full gradient is not kept: this rank's piece goes to the sink
                    self._sink(p, reduced, bool(had_somewhere))
                elif p.grad is not None:
                    p.grad.copy_(reduced.view_as(p))
                elif had_somewhere:
                    p.grad = reduced.view_as(p).clone()
            bucket.ready, bucket.flat, bucket.work = 0, None, None
        self._queued = False
