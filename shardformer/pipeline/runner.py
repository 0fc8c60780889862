"""Running pipeline steps: torch.distributed.pipelining schedules over this rank's stages.

`PipelineRunner.train_step(batch)` splits the batch into microbatches along the batch dimension
and runs the configured schedule (GPipe, 1F1B, interleaved 1F1B or zero-bubble V), with static
stage shapes (no shape-inference forward, no metadata exchange). The first stage gets the
`input_ids`; `attention_mask`, `position_ids` and `labels` reach every stage of every rank as
per-microbatch keyword arguments (each stage feeds them to HF's forward, which builds its own
mask and rotary embeddings). The loss of a microbatch is its token-loss sum over the whole batch's
target count, and `scale_grads=False`, so gradients and the summed loss are the full batch's
mean exactly. With fp16 loss scaling (`sf.ZeroOptimizer`) backward starts from each
microbatch's loss times the scale, while the step still returns the unscaled loss. A schedule is
built per microbatch shape (sequence lengths may change between steps; torch's stages fix their
buffers' shapes at the first step) and the last few are kept.

`eval_step(batch)` runs the same stages forward only, microbatch by microbatch in stage order
with point-to-point send / recv (torch 2.13's zero-bubble schedule cannot run forward only).

With a sequence split between stages (sp_mode all_to_all / ring: `sequence`), the hidden states
passed on are this rank's chunk of the sequence (`sequence.length(S)` tokens).

Tied input / output embeddings on different ranks (first and last stage) have this step's
gradients summed over those two ranks after the step (`finish`, once every rank's schedule
succeeded, so no rank waits in it for a failed one), so both copies take the same update.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining._backward import stage_backward

from ..comm import comm_device
from ..sharding import local as local_shard
from .stage import StageModule


class _Stage(PipelineStage):
    """torch's pipeline stage, except that a ZeRO-3 stage root (an FSDP2 module) runs each
    microbatch's full backward as FSDP2 runs any backward: its gradients are reduce-scattered and
    its parameters resharded after it (torch's stage would keep every layer's whole parameters
    and gradients until the step's last microbatch: no ZeRO-3 memory saving at the peak). Under
    the user's `no_sync()` FSDP2 accumulates unsharded gradients; the stage's end-of-step
    reduction then reduce-scatters them once."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if backward_type != "full" or not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
        return grads, None


_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B,
              "zbv": ScheduleZBVZeroBubble}
_KEEP_SCHEDULES = 4
PIPELINE_KWARGS = ("attention_mask", "position_ids", "labels")
IGNORE_INDEX = -100


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """How many next-token targets the batch has (HF's shift: the first position predicts none)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


class PipelineRunner:
    """This rank's stages of `plan` and the schedules that run them (see module docstring).

    Args:
        model: the cut model (`stage.cut_model`).
        pp_rank: this rank's index on the pp axis; `group`: the pp group (group rank = pp index).
        tied_group: the group of the two ranks holding the first and last stage, when the
            embeddings are tied and those differ (else None); `tied_param`: this rank's copy.
        call_model: (view, kwargs) -> HF output, the sharded model's own call.
        hidden_size: of the hidden states passed between stages (their dtype and device are the
            stages' parameters' when a step runs).
        sequence: how those are split along the sequence (`length(S)`, `place(chunk, S)`:
            `sequence_parallel.SequenceChunks`), or None: whole sequences.
    """

    def __init__(self, model, plan, pp_rank: int, group, tied_group, tied_param, call_model, hidden_size: int,
                 sequence=None):
        self.plan, self.pp_rank, self.group = plan, pp_rank, group
        self.tied_group, self.tied_param = tied_group, tied_param
        self.modules = [StageModule(model, plan, s, call_model, sequence) for s in plan.stages_of(pp_rank)]
        self.hidden_size, self.sequence = hidden_size, sequence
        self._schedules: OrderedDict = OrderedDict()
        self._tied_before = None
        self._scale, self._losses = 1.0, []  # this step's loss scale; its microbatches' unscaled losses
        # ZeRO-3: the parameters are FSDP2's fp32 masters, on the CPU with cpu_offload; the dtype and
        # (with offload) the device the stages compute in instead, set by shard_model; None: the parameters'
        self.fsdp_dtype = self.fsdp_device = None

    @property
    def has_first(self) -> bool:
        return self.modules[0].first

    @property
    def has_last(self) -> bool:
        return self.modules[-1].last

    def check_batch(self, batch: dict) -> None:
        """ValueError (before any collective) for a batch the pipeline cannot take: every stage
        must be able to split each tensor into the same microbatches."""
        extra = sorted(k for k, v in batch.items() if v is not None and k not in PIPELINE_KWARGS + ("input_ids",))
        if extra:
            raise ValueError(f"with ShardConfig.pp_size > 1, forward_backward takes input_ids, "
                             f"{', '.join(PIPELINE_KWARGS)}; got {', '.join(extra)}")
        ids = batch.get("input_ids")
        if not torch.is_tensor(ids) or ids.dim() != 2:
            raise ValueError("with ShardConfig.pp_size > 1, forward_backward needs input_ids [batch, sequence]")
        for name in PIPELINE_KWARGS:
            value = batch.get(name)
            if value is None or (name == "position_ids" and torch.is_tensor(value) and value.shape == (1, ids.shape[1])):
                continue
            if not torch.is_tensor(value) or value.shape != ids.shape:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"with ShardConfig.pp_size > 1, {name} must have input_ids' shape "
                                 f"{tuple(ids.shape)} (got {shape})")
        n = self.plan.microbatches
        if ids.shape[0] % n:
            raise ValueError(f"the batch size {ids.shape[0]} does not divide by ShardConfig.num_microbatches={n}")

    def _compute(self) -> tuple[torch.dtype, torch.device]:
        """(dtype, device) of this rank's stages' computation, read now from their parameters (the
        model may have been cast, moved, or materialised from the meta device after sharding),
        or FSDP2's at ZeRO-3 (`fsdp_dtype`, `fsdp_device`)."""
        param = next(self.modules[0].parameters())
        return self.fsdp_dtype or param.dtype, self.fsdp_device or param.device

    @property
    def device(self) -> torch.device:
        """Where this rank's stages compute."""
        return self._compute()[1]

    def _hidden(self, mb: int, seq: int, grad: bool) -> torch.Tensor:
        """A buffer of the hidden states passed between stages for a sequence of `seq` tokens."""
        dtype, device = self._compute()
        if self.sequence is not None:
            seq = self.sequence.length(seq)
        return torch.empty(mb, seq, self.hidden_size, dtype=dtype, device=device, requires_grad=grad)

    def _schedule(self, mb: int, seq: int):
        key = (mb, seq, *self._compute())
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        stages = []
        for module in self.modules:
            inputs = (torch.empty(mb, seq, dtype=torch.long, device=self.device) if module.first
                      else self._hidden(mb, seq, True))
            outputs = (torch.empty((), dtype=torch.float32, device=self.device, requires_grad=True)
                       if module.last else self._hidden(mb, seq, True))
            stages.append(_Stage(module, module.index, self.plan.stages, self.device, input_args=inputs,
                                        output_args=outputs, group=self.group))
        cls = _SCHEDULES[self.plan.schedule]
        single = self.plan.schedule in ("gpipe", "1f1b")
        schedule = cls(stages[0] if single else stages, self.plan.microbatches, loss_fn=self._loss,
                       scale_grads=False)
        self._schedules[key] = schedule
        if len(self._schedules) > _KEEP_SCHEDULES:
            self._schedules.popitem(last=False)
        return schedule

    def _loss(self, output, target):
        """The schedule's loss: the last stage's output (its microbatch's loss), kept unscaled, times
        this step's loss scale (backward starts from it)."""
        self._losses.append(output.detach().float())
        return output * self._scale if self._scale != 1.0 else output

    def _start(self, batch: dict) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]
        kwargs = {k: batch[k] for k in PIPELINE_KWARGS if batch.get(k) is not None}
        if "position_ids" in kwargs:  # one row for the whole batch: every microbatch gets it
            kwargs["position_ids"] = kwargs["position_ids"].expand(ids.shape)
        count = target_count(batch["labels"]) if batch.get("labels") is not None else None
        for module in self.modules:
            module.num_items, module.length = count, ids.shape[1]
        return ids, kwargs

    def find_tied_param(self, model) -> None:
        """Look up this rank's copy of the tied embedding again (ZeRO-3's FSDP2 replaces parameters)."""
        if self.tied_param is not None:
            path = self.plan.embedding_path if self.has_first else self.plan.head_path
            self.tied_param = model.get_submodule(path).weight

    def finish(self, local: torch.Tensor, train: bool) -> torch.Tensor:
        """After every rank's schedule succeeded: sum this step's tied-embedding gradients over
        their two stages (train) and share the loss the last stage holds; returns this replica's
        mean loss on every rank of the pipeline."""
        if train and self.tied_group is not None:
            param = self.tied_param
            step = param.grad if self._tied_before is None else param.grad - self._tied_before
            # only this step's part: accumulation stays exact; at ZeRO-3 both copies are sharded
            shard = local_shard(step)  # alike over dp: the shards add up (on the CPU with cpu_offload)
            wire = shard.to(comm_device(self.tied_group))
            dist.all_reduce(wire, group=self.tied_group)
            if wire is not shard:
                shard.copy_(wire)
            param.grad = step if self._tied_before is None else self._tied_before + step
        dist.all_reduce(local, group=self.group)
        return local

    def train_step(self, batch: dict, loss_scale: float = 1.0) -> torch.Tensor:
        """One forward + backward over all microbatches, backward from the losses times
        `loss_scale`; returns the (unscaled) loss this rank holds (the last stage's, else 0): call
        `finish` once every rank got here."""
        if self.tied_group is not None:
            param = self.tied_param
            self._tied_before = None if param.grad is None else param.grad.clone()
            if param.grad is None:  # this stage may produce no gradient for it: start from zeros
                param.grad = torch.zeros_like(param)
        ids, kwargs = self._start(batch)
        mb = ids.shape[0] // self.plan.microbatches
        schedule = self._schedule(mb, ids.shape[1])
        self._scale, self._losses = float(loss_scale), []
        schedule.step(*((ids,) if self.has_first else ()), target=batch["labels"], return_outputs=False, **kwargs)
        return torch.stack(self._losses).sum() if self.has_last else \
            torch.zeros((), dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def eval_step(self, batch: dict) -> torch.Tensor:
        """Forward only over all microbatches, stage by stage; returns the loss this rank holds
        (call `finish(loss, train=False)` once every rank got here)."""
        ids, kwargs = self._start(batch)
        n, plan = self.plan.microbatches, self.plan
        mine = {m.index: m for m in self.modules}
        local = torch.zeros((), dtype=torch.float32, device=self.device)
        for ids_mb, kw_mb in zip(ids.chunk(n), _chunk_kwargs(kwargs, n)):
            x = ids_mb
            for stage in range(plan.stages):
                if stage not in mine:
                    continue
                if stage > 0 and plan.owner(stage - 1) != self.pp_rank:
                    x = self._hidden(ids_mb.shape[0], ids_mb.shape[1], False)
                    dist.recv(x, group=self.group, group_src=plan.owner(stage - 1))
                x = mine[stage](x, **kw_mb)
                if stage == plan.stages - 1:
                    local += x.float()
                elif plan.owner(stage + 1) != self.pp_rank:
                    dist.send(x.contiguous(), group=self.group, group_dst=plan.owner(stage + 1))
        return local

    def peak_in_flight(self) -> dict[int, int]:
        """{stage: the most microbatches whose activations it held at once} since the start."""
        return {m.index: m.peak_in_flight for m in self.modules}


def _chunk_kwargs(kwargs: dict, n: int) -> list[dict]:
    pieces = {k: v.chunk(n) for k, v in kwargs.items()}
    return [{k: v[i] for k, v in pieces.items()} for i in range(n)]
