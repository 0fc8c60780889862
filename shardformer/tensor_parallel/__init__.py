"""Tensor parallelism: parallel linear / embedding / LM head layers, the vocab-parallel loss,
planning a policy against a model, applying it, and one call's output handling."""
from .apply import apply_tensor_parallel
from .embedding import VocabParallelEmbedding
from .linear import ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead
from .loss import causal_lm_loss, fused_causal_lm_loss, vocab_parallel_cross_entropy
from .output import accepts_return_dict, run_forward
from .plan import TensorParallelPlan, plan_tensor_parallel

__all__ = [
    "apply_tensor_parallel", "VocabParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear",
    "VocabParallelLMHead", "causal_lm_loss", "fused_causal_lm_loss", "vocab_parallel_cross_entropy",
    "accepts_return_dict", "run_forward", "TensorParallelPlan", "plan_tensor_parallel",
]
