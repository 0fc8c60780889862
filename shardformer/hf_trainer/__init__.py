"""`transformers.Trainer` on a sharded model: `ShardedTrainer` (see `trainer.py`).

    from shardformer.hf_trainer import ShardedTrainer
    model = sf.shard_model(model, config=sf.ShardConfig(tp_size=2))
    trainer = ShardedTrainer(model=model, args=training_args, train_dataset=..., data_collator=...)

Importing this package imports `transformers.Trainer` (and `accelerate`); `import shardformer`
alone does not.
"""
from .accelerator import data_parallel_view
from .trainer import ShardedTrainer

__all__ = ["ShardedTrainer", "data_parallel_view"]
