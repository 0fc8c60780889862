"""Per-architecture sharding policies (installed as `shardformer.policies`)."""
from .base import Policy, as_policy, get_policy, register_policy, supported_model_types
from .llama import LlamaPolicy, MistralPolicy, Qwen2Policy
from .qwen3 import Qwen3Policy

__all__ = [
    "Policy",
    "as_policy",
    "get_policy",
    "register_policy",
    "supported_model_types",
    "LlamaPolicy",
    "MistralPolicy",
    "Qwen2Policy",
    "Qwen3Policy",
]
