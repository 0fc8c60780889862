"""`ShardConfig`: the parallel layout a user asks for, validated on construction.

Only the layout itself is checked here (sizes positive, names known). Checks that need the model
(heads divisible by tp, ...) or the process world (tp divides the world) are done by
`shard_model` before any collective runs, so every error is raised at setup.
"""
from __future__ import annotations

from dataclasses import dataclass

SP_MODES = ("split_gather", "all_to_all", "ring")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zbv")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class ShardConfig:
    """Parallel degrees and features for `shard_model`.

    The world is ``dp x pp x sp x tp``; ``dp`` is whatever remains after the other three.

    Args:
        tp_size: tensor-parallel degree (attention heads, MLP and vocabulary are split over it).
        pp_size: pipeline-parallel degree: the decoder layers are cut into stages (models with an
            LM head; train with `model.forward_backward`, evaluate with `model.forward_loss`).
        sp_size: sequence-parallel degree of the sp axis (all_to_all, ring).
        sp_mode: None; "split_gather" (Megatron sequence parallelism on the tp group: needs
            tp_size > 1, sp_size stays 1); "all_to_all" (Ulysses) or "ring" (ring attention,
            causal; right padding only, ignored by the loss) on the sp axis: need sp_size > 1.
        pp_schedule: "gpipe" | "1f1b" | "interleaved" | "zbv" (torch.distributed.pipelining's
            schedules; interleaved and zbv place 2 stages on each pp rank); needs pp_size > 1
            unless left at its default.
        num_microbatches: microbatches per pipeline step (default pp_size); the batch size must
            divide by it. Needs pp_size > 1.
        pp_stage_layers: explicit decoder layers per stage (pp_size stages, 2 x pp_size for
            interleaved and zbv); default: balanced by estimated compute and memory.
        pipeline_timeout_s: how long a stage waits for a neighbouring stage before the step fails
            on every rank (a rank that raised inside a stage stops the others this way).
        zero_stage: 0 (plain data parallel); 1 (optimizer state and fp32 master weights sharded
            over the data-parallel ranks) or 2 (gradients too), with `sf.ZeroOptimizer(opt, model)`;
            3 (weights too, with FSDP2; a plain optimizer or the wrapper).
        cpu_offload: with zero_stage=3, keep the weight shards, gradients and the optimizer step
            in CPU memory (the default of `sf.ZeroOptimizer(cpu_offload=...)` at stages 1 and 2).
        enable_fused_kernels: let the policy substitute fused-kernel modules (RMSNorm, SwiGLU,
            rotary): CUDA kernels on GPUs, an exact PyTorch reference elsewhere.
        gradient_checkpointing: recompute each decoder layer in backward (HF's own mechanism).
        check_batch: before each call, check (one small all-gather) that the ranks of one model
            replica received the same batch; `forward_backward` also checks every rank's batch
            for missing labels and out-of-range ids so that a bad batch raises on every rank.
            Turn off once the data pipeline is trusted.
    """

    tp_size: int = 1
    pp_size: int = 1
    sp_size: int = 1
    sp_mode: str | None = None
    pp_schedule: str = "1f1b"
    num_microbatches: int | None = None
    zero_stage: int = 0
    pp_stage_layers: tuple[int, ...] | None = None
    pipeline_timeout_s: float = 300.0
    cpu_offload: bool = False
    enable_fused_kernels: bool = True
    gradient_checkpointing: bool = False
    check_batch: bool = True

    def __post_init__(self):
        """Check every field by type first (bool is not an int here, 0.0 is not 0), then by value."""
        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("tp_size", "pp_size", "sp_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"ShardConfig.{name} must be a positive int, got {value!r}")
        if self.sp_mode is not None and (not isinstance(self.sp_mode, str) or self.sp_mode not in SP_MODES):
            raise ValueError(f"ShardConfig.sp_mode must be None or one of {SP_MODES}, got {self.sp_mode!r}")
        if not isinstance(self.pp_schedule, str) or self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"ShardConfig.pp_schedule must be one of {PP_SCHEDULES}, got {self.pp_schedule!r}")
        if self.num_microbatches is not None and (not is_int(self.num_microbatches) or self.num_microbatches < 1):
            raise ValueError(
                f"ShardConfig.num_microbatches must be None or a positive int, got {self.num_microbatches!r}"
            )
        if self.pp_stage_layers is not None:
            if isinstance(self.pp_stage_layers, list):
                object.__setattr__(self, "pp_stage_layers", tuple(self.pp_stage_layers))
            if (not isinstance(self.pp_stage_layers, tuple) or not self.pp_stage_layers
                    or not all(is_int(n) and n > 0 for n in self.pp_stage_layers)):
                raise ValueError(f"ShardConfig.pp_stage_layers must be None or a tuple of positive ints (layers "
                                 f"per stage), got {self.pp_stage_layers!r}")
        if (isinstance(self.pipeline_timeout_s, bool) or not isinstance(self.pipeline_timeout_s, (int, float))
                or not self.pipeline_timeout_s > 0):
            raise ValueError(f"ShardConfig.pipeline_timeout_s must be a positive number of seconds, "
                             f"got {self.pipeline_timeout_s!r}")
        if not is_int(self.zero_stage) or self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"ShardConfig.zero_stage must be an int in {ZERO_STAGES}, got {self.zero_stage!r}")
        for name in ("enable_fused_kernels", "gradient_checkpointing", "check_batch", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ShardConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.sp_size > 1 and self.sp_mode is None:
            raise ValueError("ShardConfig.sp_size > 1 needs ShardConfig.sp_mode (one of %s)" % (SP_MODES,))
        if self.sp_mode in ("all_to_all", "ring") and self.sp_size < 2:
            raise ValueError(f"ShardConfig.sp_mode={self.sp_mode!r} splits the sequence over the sp axis: it needs "
                             f"ShardConfig.sp_size > 1 (got {self.sp_size})")
        if self.sp_mode == "split_gather" and self.sp_size != 1:
            raise ValueError("ShardConfig.sp_mode='split_gather' runs on the tensor-parallel group: leave "
                             f"ShardConfig.sp_size at 1 (got {self.sp_size})")
        if self.sp_mode == "split_gather" and self.tp_size < 2:
            raise ValueError("ShardConfig.sp_mode='split_gather' splits the sequence over the tensor-parallel "
                             f"group: it needs ShardConfig.tp_size > 1 (got {self.tp_size})")
        if self.pp_size == 1:
            for name, unset in (("pp_schedule", self.pp_schedule == "1f1b"), ("num_microbatches",
                                self.num_microbatches is None), ("pp_stage_layers", self.pp_stage_layers is None)):
                if not unset:
                    raise ValueError(f"ShardConfig.{name}={getattr(self, name)!r} needs ShardConfig.pp_size > 1")

    @property
    def virtual_stages(self) -> int:
        """Pipeline stages per pp rank: 2 for the interleaved and zbv schedules, else 1."""
        return 2 if self.pp_schedule in ("interleaved", "zbv") else 1

    @property
    def model_parallel_size(self) -> int:
        """Ranks one model replica spans (pp x sp x tp)."""
        return self.pp_size * self.sp_size * self.tp_size
