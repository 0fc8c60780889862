"""Sequence parallelism: split_gather (Megatron, on the tp group), all_to_all (Ulysses) and ring
attention (on the sp axis)."""
from .calls import SequenceCalls, gather_hidden_hook
from .split_gather import SplitGatherPlan, apply_split_gather, plan_split_gather
from .ulysses import SequenceChunks, UlyssesPlan, apply_ulysses, plan_ulysses

__all__ = ["SplitGatherPlan", "apply_split_gather", "plan_split_gather", "SequenceCalls", "SequenceChunks",
           "UlyssesPlan", "apply_ulysses", "plan_ulysses", "gather_hidden_hook"]
