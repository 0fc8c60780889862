"""Sequence parallelism: split_gather (Megatron, on the tp group) and all_to_all (Ulysses, on the
sp axis). Ring attention comes here."""
from .calls import UlyssesCalls, gather_hidden_hook
from .split_gather import SplitGatherPlan, apply_split_gather, plan_split_gather
from .ulysses import UlyssesPlan, apply_ulysses, plan_ulysses

__all__ = ["SplitGatherPlan", "apply_split_gather", "plan_split_gather", "UlyssesCalls", "UlyssesPlan",
           "apply_ulysses", "plan_ulysses", "gather_hidden_hook"]
