"""Data parallelism: the gradient reducer (bucketed dp mean, partial-copy sums) and ZeRO stages
1 and 2 (`ZeroOptimizer`)."""
from .reducer import GradReducer
from .zero import ShardLayout, ZeroOptimizer, per_rank_bytes

__all__ = ["GradReducer", "ShardLayout", "ZeroOptimizer", "per_rank_bytes"]
