"""`ShardedTrainer`: `transformers.Trainer` for a model returned by `sf.shard_model`.

An existing Trainer script changes in two lines: `model = sf.shard_model(model, config=...)` and
`Trainer` -> `ShardedTrainer` (same arguments). Launched with `torchrun`, it then trains the
sharded model (tensor, sequence and data parallelism, ZeRO 1-3) exactly as the stock Trainer
trains the unsharded model with DDP over the data-parallel ranks. What differs from the stock
Trainer, and through which of its seams:
  * distribution (data loaders over the dp axis only, no DDP wrapper, gathers over dp, clipping
    by the global norm, the fp16 loss scale of ZeRO): the Trainer's accelerator is given a
    data-parallel view of the model (`accelerator.py`), right after the Trainer creates it
    (`create_accelerator_and_postprocess`). The training step is the Trainer's own
    (`model(**inputs)`, then `loss.backward()`: the model reduces its gradients in its backward
    hooks; `accelerator.no_sync` reaches `model.no_sync` for gradient accumulation).
  * batch validation (`compute_loss`): before each training forward every rank validates its
    batch as `model.forward_backward` does (labels present, input ids and labels inside the
    vocabulary, the ranks of each replica holding the same batch unless
    `ShardConfig(check_batch=False)`) and shares the outcome in one small all-gather over the
    world, so that a bad batch on one rank raises ValueError on every rank instead of leaving
    the others waiting for the process group's timeout; the forward then skips its own check.
  * ZeRO: with `ShardConfig(zero_stage=k)` the optimizer the Trainer builds (or the one passed
    in `optimizers=`) is wrapped in `sf.ZeroOptimizer` (`create_optimizer`); the LR scheduler
    drives the wrapped optimizer (`create_scheduler`). Passing `optimizers=(sf.ZeroOptimizer(...),
    scheduler)` works too.
  * saving: `save_model` (and so every checkpoint) writes the whole model as a plain HF
    directory from every rank (`sf.save_pretrained`); checkpoints hold each rank's optimizer
    state (`checkpoint.py`); resuming reads the weights into the shards in place, then each
    rank's optimizer state, the scheduler and the RNG states (the stock Trainer's files).
  * evaluation: with `compute_metrics`, tensor-parallel logits are gathered to the full
    vocabulary (`prediction_step`).
  * the batch size the Trainer reports counts dp ranks, not processes.
Refused at setup (ValueError naming the field): a model not from `sf.shard_model`, pipeline
parallelism (`ShardConfig.pp_size > 1`: train with `model.forward_backward`), `fp16=True` (the
accelerate GradScaler checks overflow per rank; use bf16, or an fp16 model under ZeRO whose
`sf.ZeroOptimizer` scales the loss), FSDP / DeepSpeed from the Trainer, `dispatch_batches=True`,
`train_sampling_strategy="batch_rebalance"`, `load_best_model_at_end` at ZeRO 1-2, and several
processes that accelerate does not run as one job (on CPUs it does only with `use_cpu=True`).
The private methods overridden (`_save_optimizer_and_scheduler`, `_load_optimizer_and_scheduler`,
`_load_from_checkpoint`, `_load_best_model`) have the same names and signatures in transformers
5.17 through 5.24; tests/test_trainer.py runs on both.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.training_args import ParallelMode

from ..checkpoint import save_pretrained
from ..data_parallel import ZeroOptimizer
from .accelerator import data_parallel_view
from .checkpoint import load_optimizer, load_weights, save_optimizer

TRAINING_ARGS_NAME = "training_args.bin"  # the stock Trainer's names inside a checkpoint
SCHEDULER_NAME = "scheduler.pt"


def check_model(model) -> None:
    """ValueError unless `model` is a sharded model the Trainer can train."""
    config = getattr(model, "sf_config", None)
    if config is None:
        raise ValueError(f"ShardedTrainer(model=...) expects a model returned by sf.shard_model (got "
                         f"{type(model).__name__}); use transformers.Trainer for an unsharded model")
    if config.pp_size > 1:
        raise ValueError(f"ShardConfig.pp_size={config.pp_size}: ShardedTrainer does not run pipeline schedules; "
                         "train a pipelined model with model.forward_backward(**batch) (see README)")


def check_args(args, model) -> None:
    """ValueError for TrainingArguments a sharded model cannot honour (see module docstring)."""
    if dist.get_world_size() > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(f"TrainingArguments: {dist.get_world_size()} processes, but accelerate does not run them as "
                         "one distributed job (on CPUs it does so only with use_cpu=True); every rank would train "
                         "and save as if alone")
    if args.fp16:
        raise ValueError("TrainingArguments.fp16=True: the GradScaler would skip steps on some ranks only; use "
                         "bf16=True, or an fp16 model with ShardConfig(zero_stage=...) (sf.ZeroOptimizer scales "
                         "the loss)")
    if args.fsdp or args.deepspeed:
        raise ValueError("TrainingArguments.fsdp / deepspeed: shardformer shards the model itself; use "
                         "ShardConfig(zero_stage=1, 2 or 3) instead")
    if args.accelerator_config.dispatch_batches:
        raise ValueError("TrainingArguments.accelerator_config.dispatch_batches=True: rank 0 would split each batch "
                         "over every process; a sharded model needs each data-parallel rank to read its own batches")
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        raise ValueError("TrainingArguments.train_sampling_strategy='batch_rebalance' balances over every process, "
                         "not over the data-parallel ranks; use 'random' or 'group_by_length'")
    if args.load_best_model_at_end and model.sf_config.zero_stage in (1, 2):
        raise ValueError(f"TrainingArguments.load_best_model_at_end with ShardConfig.zero_stage="
                         f"{model.sf_config.zero_stage}: the optimizer's master weights would not follow; "
                         "reload the best checkpoint with sf.load_pretrained instead")


class ShardedTrainer(Trainer):
    """`transformers.Trainer` for a model returned by `sf.shard_model` (see module docstring):
    the same constructor, `train`, `evaluate`, `save_model` and checkpoints."""

    def __init__(self, model=None, args=None, *rest, **kwargs):
        check_model(model)
        super().__init__(model, args, *rest, **kwargs)
        check_args(self.args, self.model)

    def create_accelerator_and_postprocess(self) -> None:
        """The stock accelerator, with the data-parallel view of the sharded model."""
        if self.args.accelerator_config.dispatch_batches is None:  # accelerate's default dispatches iterable data
            self.args.accelerator_config.dispatch_batches = False
        super().create_accelerator_and_postprocess()
        data_parallel_view(self.accelerator, self.model)

    def create_optimizer(self, model=None):
        """The stock optimizer (or the one passed in `optimizers=`), in `sf.ZeroOptimizer` at ZeRO."""
        super().create_optimizer(model)
        if self.model.sf_config.zero_stage and not isinstance(self.optimizer, ZeroOptimizer):
            self.optimizer = ZeroOptimizer(self.optimizer, self.model)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The stock scheduler; for `sf.ZeroOptimizer` it drives the wrapped optimizer."""
        if optimizer is None and isinstance(self.optimizer, ZeroOptimizer):
            optimizer = self.optimizer.inner
        return super().create_scheduler(num_training_steps, optimizer)

    def get_total_train_batch_size(self, args) -> int:
        """Sequences per optimizer step: per-device batch x accumulation x dp ranks."""
        return self._train_batch_size * args.gradient_accumulation_steps * self.model.sf_mesh["dp"].size()

    # ------------------------------------------------------------------ the training step
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The stock loss (`num_items_in_batch`, label smoothing, `compute_loss_func`,
        `return_outputs` unchanged). In training (the model in train mode, as `training_step`
        leaves it) the batch is first validated on every rank, as `model.forward_backward`
        validates its own: labels present, input ids and labels inside the vocabulary, the ranks
        of each model replica (tp / sp peers) holding the same batch (unless
        `ShardConfig(check_batch=False)`), no parameter made trainable after sharding. The ranks
        share the outcome in one small all-gather over the world, so a bad batch on any rank
        raises ValueError on every rank (naming the problem) instead of failing on that rank
        alone while the others wait in a collective until the process group's timeout. That
        exchange is the step's only batch check: the forward skips its own. Evaluation
        (`prediction_step`, the model in eval mode, with or without labels) and a model whose
        forward takes no `labels` get the stock call with the forward's own check."""
        sharded = self.model
        if not (model.training and getattr(sharded, "sf_takes_labels", False)):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                         num_items_in_batch=num_items_in_batch)
        inputs = sharded._validate_step(inputs, "ShardedTrainer.training_step")  # every rank, one exchange
        sharded.sf_batch_checked = True
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            sharded.sf_batch_checked = False

    # ------------------------------------------------------------------ saving and resuming
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The whole model as a plain HF directory, from any layout (every rank must call it, as
        the Trainer does), with the tokenizer / processor and the training arguments."""
        output_dir = self.args.output_dir if output_dir is None else output_dir
        save_pretrained(self.model, output_dir)
        if self.args.should_save:
            processor = self.processing_class or getattr(self.data_collator, "tokenizer", None)
            if processor is not None:
                processor.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        save_optimizer(self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not load_optimizer(self.optimizer, self.model, checkpoint):
            return
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_weights(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_weights(self.model, self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """The stock step; logits that are this rank's vocabulary slice are gathered whole."""
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is not None:
            logits = whole_logits(self.model, logits)
        return loss, logits, labels


def whole_logits(model, logits):
    """Full-vocabulary logits from a tensor-parallel rank's vocabulary slice (each tensor of a
    tuple whose last dimension is the slice); ValueError for the sequence chunks of sp_mode
    all_to_all / ring."""
    if isinstance(logits, (tuple, list)):
        return type(logits)(whole_logits(model, x) for x in logits)
    if model.sf_config.sp_mode in ("all_to_all", "ring"):
        raise ValueError(f"ShardConfig.sp_mode={model.sf_config.sp_mode!r}: evaluation logits are sequence chunks; "
                         "evaluate with prediction_loss_only=True (or without compute_metrics)")
    head = model.sf_lm_head
    if (head is None or model.sf_config.tp_size == 1 or not torch.is_tensor(logits)
            or logits.shape[-1] != head.vocab_valid or logits.shape[-1] == head.vocab_size):
        return logits
    with torch.no_grad():
        return head.gather_logits(logits)
