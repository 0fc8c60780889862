"""ZeRO stages 1 and 2: optimizer state, fp32 master weights and (stage 2) gradients sharded over
the data-parallel ranks (`ParallelGroups.data`: dp, times sp under sequence parallelism, the
ranks that hold identical parameters).

Layout (`ShardLayout`): each parameter's flat tensor, zero-padded to a multiple of n ranks, is cut
into n equal pieces; rank r owns piece r of every parameter. So each rank holds 1/n of every
parameter's master weight and optimizer state (plus at most n - 1 padding entries a parameter).
  * stage 1: backward all-reduces gradients as without ZeRO (`GradReducer`); `step()` takes this
    rank's piece of each reduced gradient.
  * stage 2: the reducer reduce-scatters each bucket while backward runs (`GradReducer
    .scatter_to`), so a rank receives only the mean of its pieces and frees the full gradient;
    pieces accumulate across backwards until `step()` consumes them (gradient accumulation;
    under `no_sync()` full gradients accumulate locally and the next synchronised backward
    scatters them).
  * `step()`: the wrapped optimizer steps on the fp32 master pieces, then each bucket of updated
    pieces is all-gathered into the model's parameters (cast to their dtype).
Mixed precision: bf16 / fp16 parameters keep fp32 masters; fp16 adds dynamic loss scaling
(`forward_backward` multiplies the loss by the scale, with pipelines each microbatch's loss;
an inf or nan in any rank's gradient skips the step on every rank and halves the scale, which
doubles again after `growth_interval` good steps). The wrapped optimizer must be element-wise
(its update of each entry depends only on that entry): checked once by stepping it on a tensor
whole and in two pieces.
Stage 3: FSDP2 holds the shards (fp32 masters for a bf16 / fp16 model, see `zero3.py`); the
wrapper steps the wrapped optimizer on them and clips; with fp16 it scales the loss, agrees on
an overflow over the world and unscales the gradients' local shards in place before clipping
and the step, and a step (taken or skipped) then drops them, so that unscaled values never mix
with the next backward's scaled ones.
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.distributed as dist

from ..comm import agree_on_failure, all_gather_into, comm_device
from ..grad_clip import clip_grad_norm_, clip_gradients
from ..sharding import gather_full, local, sharded_parameters, split_tensor

logger = logging.getLogger("shardformer")


class ShardLayout:
    """Which flat piece of each parameter a rank owns over `group` (see module docstring)."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def piece_size(self, p: torch.Tensor) -> int:
        return -(-p.numel() // self.size)

    def padded(self, flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        pad = self.piece_size(p) * self.size - flat.numel()
        return flat if pad == 0 else torch.cat([flat, flat.new_zeros(pad)])

    def slice_of(self, p: torch.Tensor, rank: int) -> slice:
        n = self.piece_size(p)
        return slice(rank * n, (rank + 1) * n)

    def piece(self, flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """This rank's piece of `flat` (a flat tensor shaped like `p`'s flat view)."""
        return self.padded(flat, p)[self.slice_of(p, self.rank)]


def held_params(optimizer) -> list:
    """Every tensor the optimizer steps, in its groups' order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _probe_elementwise(optimizer) -> int:
    """Step a fresh optimizer of the same class and settings on one tensor whole and on two
    pieces of it; ValueError unless the results agree and its state is shaped like the
    parameter. Returns the number of parameter-shaped state tensors it keeps."""
    cls = type(optimizer)
    gen = torch.Generator().manual_seed(0)
    whole = torch.randn(4, 6, generator=gen)
    grads = [torch.randn(4, 6, generator=gen) for _ in range(2)]
    a = whole.clone().requires_grad_()
    b = [whole.reshape(-1)[:10].clone().requires_grad_(), whole.reshape(-1)[10:].clone().requires_grad_()]
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(q.kind is q.VAR_KEYWORD for q in params.values())
    settings = {k: v for k, v in optimizer.defaults.items() if (takes_any or k in params) and k != "capturable"}
    try:
        opt_a, opt_b = cls([a], **settings), cls(b, **settings)
        for g in grads:
            a.grad = g.clone()
            b[0].grad, b[1].grad = g.reshape(-1)[:10].clone(), g.reshape(-1)[10:].clone()
            opt_a.step()
            opt_b.step()
    except Exception as err:  # noqa: BLE001 - reported as the refusal's reason
        raise ValueError(f"sf.ZeroOptimizer could not step a {cls.__name__} on a test tensor to check that it is "
                         f"element-wise ({type(err).__name__}: {err})") from err
    pieces = torch.cat([t.detach() for t in b])
    shaped = [v for v in opt_a.state[a].values() if torch.is_tensor(v) and v.numel() > 1]
    if not torch.allclose(a.detach().reshape(-1), pieces, rtol=1e-6, atol=1e-7) or \
            any(v.shape != a.shape for v in shaped):
        raise ValueError(f"sf.ZeroOptimizer needs an element-wise optimizer (each entry's update depends only on "
                         f"that entry, as AdamW, Adam, SGD, Lion): {cls.__name__} is not (its update or state "
                         "depends on whole tensors), so it cannot step on shards")
    return len(shaped)


class ZeroOptimizer:
    """Wraps `optimizer` (built on `model.parameters()`) for `ShardConfig.zero_stage` 1 or 2; at
    stage 3 (FSDP2 shards the weights) it steps, clips, saves and scales fp16 losses.

    Args:
        optimizer: an element-wise torch optimizer over every trainable parameter of `model`,
            before its first step.
        model: a model returned by `sf.shard_model` with `zero_stage` 1, 2 or 3.
        stage: optional; must equal `model.sf_config.zero_stage`.
        bucket_size_mb: size of the all-gather buckets after `step()` (the gradient buckets are
            the model's reducer's).
        overlap_communication: stage 2 reduce-scatters buckets while backward runs (always on).
        cpu_offload: keep master weights and optimizer state in CPU memory and step there
            (default `ShardConfig.cpu_offload`; at stage 3 that field decides).
        initial_scale, growth_interval: fp16 dynamic loss scaling.
    """

    def __init__(self, optimizer, model, stage: int | None = None, bucket_size_mb: float = 25.0,
                 overlap_communication: bool = True, cpu_offload: bool | None = None,
                 initial_scale: float = 2.0 ** 16, growth_interval: int = 1000):
        error, count = None, 0
        try:
            count = self._validate(optimizer, model, stage, cpu_offload)
        except Exception as err:  # noqa: BLE001 - every rank raises below
            error = err
        agree_on_failure(error, None, "sf.ZeroOptimizer")
        self.inner, self.model, self.stage = optimizer, model, model.sf_config.zero_stage
        model.sf_zero = self
        self.scale, self.growth_interval, self._good_steps = float(initial_scale), growth_interval, 0
        self._prepared, self.found_inf = False, False
        if self.stage == 3:  # FSDP2 holds the shards: the wrapper steps, clips and saves through it
            self.params = list(model.parameters())
            self.fp16 = getattr(model, "sf_param_dtype", None) == torch.float16
            return
        cpu_offload = model.sf_config.cpu_offload if cpu_offload is None else cpu_offload
        self.cpu_offload, self.bucket_bytes = cpu_offload, int(bucket_size_mb * 2 ** 20)
        self.overlap_communication = overlap_communication
        self.layout = ShardLayout(model.sf_groups.data)
        self.params = held_params(optimizer)
        device = torch.device("cpu") if cpu_offload else None
        self.masters = {}
        for group in optimizer.param_groups:
            group["params"] = [self._master(p, device) for p in group["params"]]
        self.copies = {id(p): spec.replicas * spec.stage_copies for _, p, spec in sharded_parameters(model)}
        self.pieces: dict[int, torch.Tensor] = {}  # stage 2: accumulated reduced gradient pieces
        self.fp16 = any(p.dtype == torch.float16 for p in self.params)
        if self.stage == 2 and model.sf_grad_reducer.active:
            model.sf_grad_reducer.scatter_to(self.layout, self._receive)
        if dist.get_rank() == 0:
            logger.info(self.describe(count))

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _validate(optimizer, model, stage, cpu_offload) -> int:
        config = getattr(model, "sf_config", None)
        if config is None:
            raise ValueError("sf.ZeroOptimizer(optimizer, model): model must be returned by sf.shard_model")
        if config.zero_stage not in (1, 2, 3):
            raise ValueError(f"sf.ZeroOptimizer needs a model sharded with ShardConfig.zero_stage 1, 2 or 3 "
                             f"(got ShardConfig.zero_stage={config.zero_stage})")
        if config.zero_stage == 3 and cpu_offload is not None and cpu_offload != config.cpu_offload:
            raise ValueError(f"sf.ZeroOptimizer(cpu_offload={cpu_offload}) at stage 3: the weights were sharded with "
                             f"ShardConfig.cpu_offload={config.cpu_offload}; set it there")
        if stage is not None and stage != config.zero_stage:
            raise ValueError(f"sf.ZeroOptimizer(stage={stage}) disagrees with the model's "
                             f"ShardConfig.zero_stage={config.zero_stage}")
        if optimizer.state:
            raise ValueError("sf.ZeroOptimizer must wrap the optimizer before its first step (it has state)")
        params = held_params(optimizer)
        held = {id(p) for p in params}
        names = {id(p): n for n, p in model.named_parameters()}
        foreign = [p for p in params if id(p) not in names]
        if foreign:
            raise ValueError(f"sf.ZeroOptimizer: the optimizer holds {len(foreign)} tensor(s) that are not "
                             f"parameters of this model (was it built on another model's parameters?)")
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(f"sf.ZeroOptimizer: model parameter {missing[0]} (and {len(missing) - 1} more) is not in "
                             "the optimizer; build it on model.parameters()")
        if config.zero_stage == 3 and not all(hasattr(p, "to_local") for p in params):
            raise ValueError("sf.ZeroOptimizer at stage 3: the optimizer holds unsharded tensors (was it built while "
                             "FSDP held the parameters gathered, e.g. right after a forward without backward?)")
        return 0 if config.zero_stage == 3 else _probe_elementwise(optimizer)

    def _master(self, p: torch.Tensor, device) -> torch.Tensor:
        piece = self.layout.piece(p.detach().reshape(-1), p).to(torch.float32, copy=True)
        master = piece.to(device) if device is not None else piece
        self.masters[id(p)] = master
        return master

    def describe(self, state_tensors: int) -> str:
        """The log line: bytes per rank for weights, gradients and optimizer state."""
        weights = sum(p.numel() * p.element_size() for p in self.params)
        masters = sum(m.numel() * m.element_size() for m in self.masters.values())
        grads = masters if self.stage == 2 else sum(p.numel() * p.element_size() for p in self.params)
        return (f"sf.ZeroOptimizer stage {self.stage} over {self.layout.size} data-parallel ranks, per rank: "
                f"weights {weights} B, gradients {grads} B, master weights {masters} B, optimizer state "
                f"{masters * state_tensors} B ({state_tensors} tensors like the masters)")

    # ------------------------------------------------------------------ gradients
    def _receive(self, param, piece: torch.Tensor, had: bool) -> None:
        if not had:
            return
        piece = piece.to(torch.float32)
        held = self.pieces.get(id(param))
        self.pieces[id(param)] = piece.clone() if held is None else held.add_(piece)

    def _gradient_piece(self, p):
        if self.stage == 2 and self.model.sf_grad_reducer.active:
            return self.pieces.get(id(p))
        return None if p.grad is None else self.layout.piece(p.grad.reshape(-1), p).to(torch.float32, copy=True)

    def _prepare(self) -> None:
        """Put this rank's gradient pieces on the masters (stage 3: FSDP's shards are them); fp16:
        agree on overflow, then unscale."""
        if self._prepared:
            return
        if self.stage == 3:
            unscale = held = [local(p.grad) for p in self.params if p.grad is not None]
        else:
            for p in self.params:
                g = self._gradient_piece(p)
                master = self.masters[id(p)]
                master.grad = None if g is None else g.to(master.device)
            unscale = [m.grad for m in self.masters.values() if m.grad is not None]
            held = unscale + [p.grad for p in self.params if p.grad is not None]  # stage 1: whole local ones
        if self.fp16:
            self.found_inf = _overflow_anywhere(held)
            if not self.found_inf:
                for g in unscale:
                    g.mul_(1.0 / self.scale)
        self._prepared = True

    @property
    def loss_scale(self) -> float:
        """What `forward_backward` multiplies the loss by (1 unless the model is fp16)."""
        return self.scale if self.fp16 else 1.0

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the global norm of the unsharded model's gradient (every rank's pieces, each
        entry counted once over tp, sp, pp and dp); returns it. Every rank must call it."""
        self._prepare()
        if self.found_inf:
            return torch.tensor(float("inf"))
        if self.stage == 3:  # FSDP's gradient shards are disjoint over dp (x sp)
            return clip_grad_norm_(self.model, max_norm, 1, norm_type)
        entries = [(m.grad, self.copies.get(id(p), 1)) for p in self.params
                   for m in (self.masters[id(p)],) if m.grad is not None]
        return clip_gradients(entries, max_norm, 1, norm_type)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Step on the master pieces and all-gather them into the parameters; with fp16, an
        overflow anywhere skips the step everywhere (returns None)."""
        if closure is not None:
            raise ValueError("sf.ZeroOptimizer.step does not take a closure")
        self._prepare()
        self._prepared = False
        if self.found_inf:  # skipped: its gradients are dropped as a step's would be consumed
            self.scale /= 2.0
            self._good_steps = 0
            self.found_inf = False
            self._drop_gradients()
            return None
        self.inner.step()
        self._drop_gradients()  # a step consumes the gradient pieces (full gradients: zero_grad as usual)
        if self.fp16:
            self._good_steps += 1
            if self._good_steps % self.growth_interval == 0:
                self.scale *= 2.0
        if self.stage < 3:
            self._gather_parameters()
        return None

    def _drop_gradients(self) -> None:
        if self.stage == 3:  # fp16: the (unscaled) shards must not meet the next backward's scaled ones
            if self.fp16:
                self.model.zero_grad(set_to_none=True)
            return
        self.pieces.clear()
        for m in self.masters.values():
            m.grad = None

    def _gather_parameters(self) -> None:
        """All-gather each bucket of updated pieces into the parameters (cast to their dtype)."""
        n, group = self.layout.size, self.layout.group
        bucket, size = [], 0
        for p in self.params + [None]:
            if p is not None and (not bucket or (p.dtype == bucket[0].dtype and size < self.bucket_bytes)):
                bucket.append(p)
                size += self.layout.piece_size(p) * p.element_size()
                continue
            mine = torch.cat([self.masters[id(q)].to(q.device, q.dtype) for q in bucket])
            full = torch.empty(n * mine.numel(), dtype=mine.dtype, device=mine.device)
            if n > 1:
                all_gather_into(full, mine, group=group)
            else:
                full.copy_(mine)
            segments = full.view(n, -1)
            offset = 0
            for q in bucket:
                k = self.layout.piece_size(q)
                q.data.copy_(segments[:, offset:offset + k].reshape(-1)[:q.numel()].view_as(q))
                offset += k
            bucket, size = ([p], self.layout.piece_size(p) * p.element_size()) if p is not None else ([], 0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients, this rank's pieces and the masters' gradients."""
        self.model.zero_grad(set_to_none=True)
        self._drop_gradients()
        self._prepared = False

    # ------------------------------------------------------------------ state
    @property
    def param_groups(self):
        return self.inner.param_groups

    def state_dict(self) -> dict:
        """This rank's state (resume on the same layout): the wrapped optimizer's state over the
        master pieces, the master pieces themselves and the loss scale (stage 3: the wrapped
        optimizer's state over this rank's FSDP shards, and the loss scale)."""
        if self.stage == 3:
            return {"inner": self.inner.state_dict(), "scale": self.scale, "good_steps": self._good_steps,
                    "layout": self._stage3_layout()}
        return {"inner": self.inner.state_dict(), "masters": [self.masters[id(p)].clone() for p in self.params],
                "scale": self.scale, "good_steps": self._good_steps,
                "layout": {"stage": self.stage, "ranks": self.layout.size, "rank": self.layout.rank,
                           "pieces": [self.layout.piece_size(p) for p in self.params]}}

    def _stage3_layout(self) -> dict:
        """What a stage-3 state is only valid for: the mesh, this rank and its FSDP2 shards' shapes."""
        mesh = self.model.sf_mesh
        return {"stage": 3, "mesh": dict(zip(mesh.mesh_dim_names, map(int, mesh.mesh.shape))),
                "rank": dist.get_rank(), "shards": [list(local(p).shape) for p in self.params]}

    def consolidated_state_dict(self) -> dict:
        """The unsharded model's optimizer state by parameter name (see the module function);
        stages 1 and 2."""
        if self.stage == 3:
            raise ValueError("consolidated_state_dict at stage 3: use torch.distributed.checkpoint on the "
                             "FSDP2 optimizer state")
        return consolidated_state_dict(self)

    def load_consolidated_state_dict(self, state: dict) -> None:
        """Resume from a `consolidated_state_dict` saved on any layout (stages 1 and 2)."""
        if self.stage == 3:
            raise ValueError("load_consolidated_state_dict at stage 3 is not supported")
        load_consolidated_state_dict(self, state)

    def load_state_dict(self, state: dict) -> None:
        if self.stage == 3:
            saved, mine = state.get("layout"), self._stage3_layout()
            # (a state saved before the stage-3 layout was recorded says {"stage": 3} only)
            if not isinstance(saved, dict) or saved.get("stage") != 3 or (len(saved) > 1 and saved != mine):
                mesh = saved.get("mesh") if isinstance(saved, dict) else None
                raise ValueError(f"sf.ZeroOptimizer.load_state_dict: the state was saved on another layout (mesh "
                                 f"{mesh}, rank {saved.get('rank') if isinstance(saved, dict) else None}; this one: "
                                 f"mesh {mine['mesh']}, rank {mine['rank']}, or other FSDP2 shard shapes)")
            self.inner.load_state_dict(state["inner"])
            # (a stage-3 state saved before it carried the loss scale keeps this wrapper's)
            self.scale, self._good_steps = float(state.get("scale", self.scale)), int(state.get("good_steps", 0))
            return
        expected = {"stage": self.stage, "ranks": self.layout.size, "rank": self.layout.rank,
                    "pieces": [self.layout.piece_size(p) for p in self.params]}
        if state.get("layout") != expected:
            raise ValueError("sf.ZeroOptimizer.load_state_dict: the state was saved on another layout "
                             f"({state.get('layout', {}).get('ranks')} ranks, stage {state.get('layout', {}).get('stage')}; "
                             f"this one: {self.layout.size} ranks, stage {self.stage}); use consolidated_state_dict")
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for p, saved in zip(self.params, state["masters"]):
                self.masters[id(p)].copy_(saved)
        self.scale, self._good_steps = float(state["scale"]), int(state["good_steps"])


def _overflow_anywhere(grads) -> bool:
    """Whether any rank of the world (every stage and replica) holds an inf or nan in `grads`."""
    mine = any(not bool(torch.isfinite(g).all()) for g in grads)
    flag = torch.tensor([float(mine)], device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _whole(zero: ZeroOptimizer, piece: torch.Tensor, p: torch.Tensor, spec) -> torch.Tensor:
    """The unsharded tensor (the HF parameter's shape) from every data rank's `piece` of `p`'s
    tensor-parallel shard: all-gather over the data group, then over tp (collectives)."""
    n = zero.layout.size
    pieces = torch.empty(n * piece.numel(), dtype=piece.dtype, device=p.device)
    all_gather_into(pieces, piece.to(p.device).contiguous(), group=zero.layout.group)
    shard = pieces[:p.numel()].view(p.shape)
    return gather_full(shard, spec, zero.model.sf_mesh.get_group("tp")).cpu()


def consolidated_state_dict(zero: ZeroOptimizer) -> dict:
    """The optimizer state of the unsharded model, keyed by HF parameter name (master weight and
    every state tensor in the parameter's full shape; scalars such as `step` as they are), with
    the hyperparameters and the loss scale: to resume on another layout with
    `load_consolidated_state_dict`. Every rank must call it; every rank gets it (with pipeline
    parallelism, its own stages' parameters)."""
    specs = {id(p): spec for _, p, spec in sharded_parameters(zero.model)}
    names = {id(p): n for n, p in zero.model.named_parameters()}
    state = {}
    for p in zero.params:
        master = zero.masters[id(p)]
        entries = {"master": master, **zero.inner.state.get(master, {})}
        state[names[id(p)]] = {k: _whole(zero, v, p, specs[id(p)]) if torch.is_tensor(v) and v.shape == master.shape
                               else v for k, v in entries.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in zero.inner.param_groups]
    return {"state": state, "param_groups": groups, "scale": zero.scale, "good_steps": zero._good_steps}


@torch.no_grad()
def load_consolidated_state_dict(zero: ZeroOptimizer, full_state: dict) -> None:
    """Take this rank's pieces of a `consolidated_state_dict` saved on any layout."""
    specs = {id(p): spec for _, p, spec in sharded_parameters(zero.model)}
    names = {id(p): n for n, p in zero.model.named_parameters()}
    tp_rank = zero.model.sf_mesh.get_local_rank("tp")
    missing = [names[id(p)] for p in zero.params if names[id(p)] not in full_state["state"]]
    if missing:
        raise ValueError(f"load_consolidated_state_dict: no state for parameter {missing[0]}")
    for p in zero.params:
        master = zero.masters[id(p)]
        entry = full_state["state"][names[id(p)]]

        def mine(t):
            shard = split_tensor(t.to(p.device), specs[id(p)], tp_rank)
            return zero.layout.piece(shard.reshape(-1), p).to(master.device, torch.float32)

        master.copy_(mine(entry["master"]))
        shape = entry["master"].shape  # the unsharded parameter's
        zero.inner.state[master] = {k: mine(v) if torch.is_tensor(v) and v.shape == shape else v
                                    for k, v in entry.items() if k != "master"}
    for group, saved in zip(zero.inner.param_groups, full_state["param_groups"]):
        group.update(saved)
    zero.scale, zero._good_steps = float(full_state["scale"]), int(full_state["good_steps"])
    zero._gather_parameters()


def per_rank_bytes(zero: ZeroOptimizer) -> dict[str, int]:
    """What this rank holds now, measured from the tensors: weights, gradients (full `.grad` and
    stage-2 pieces), master weights and optimizer state."""
    def size(t):
        t = local(t)
        return t.numel() * t.element_size()

    states = [v for s in zero.inner.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    return {
        "weights": sum(size(p) for p in zero.params),
        "gradients": sum(size(p.grad) for p in zero.params if p.grad is not None)
        + sum(size(t) for t in getattr(zero, "pieces", {}).values()),
        "master_weights": sum(size(m) for m in getattr(zero, "masters", {}).values()),
        "optimizer_state": sum(size(t) for t in states),
    }


__all__ = ["ZeroOptimizer", "ShardLayout", "per_rank_bytes", "consolidated_state_dict", "load_consolidated_state_dict"]
