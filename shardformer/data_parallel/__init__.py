"""Data parallelism: the gradient reducer (bucketed dp mean, partial-copy sums), ZeRO stages 1
and 2 (`ZeroOptimizer`) and stage 3 (FSDP2, `zero3`)."""
from .reducer import GradReducer
from .zero import ShardLayout, ZeroOptimizer, per_rank_bytes
from .zero3 import apply_zero3, plan_zero3

__all__ = ["GradReducer", "ShardLayout", "ZeroOptimizer", "per_rank_bytes", "apply_zero3", "plan_zero3"]
