"""Per-architecture sharding policies (installed as `shardformer.policies`)."""
from .base import Policy, as_policy, get_policy, register_policy, supported_model_types
from .infer import infer_policy, registered_or_inferred
from .bert import BertPolicy
from .gemma import Gemma2Policy, Gemma3TextPolicy
from .gpt2 import GPT2Policy
from .llama import LlamaPolicy, MistralPolicy, Qwen2Policy
from .mixtral import MixtralPolicy
from .olmo import Olmo2Policy, OlmoePolicy
from .phi3 import Phi3Policy
from .qwen3 import Qwen3Policy

__all__ = [
    "Policy",
    "as_policy",
    "get_policy",
    "register_policy",
    "supported_model_types",
    "infer_policy",
    "registered_or_inferred",
    "LlamaPolicy",
    "MistralPolicy",
    "Qwen2Policy",
    "Qwen3Policy",
    "Phi3Policy",
    "Gemma2Policy",
    "Gemma3TextPolicy",
    "GPT2Policy",
    "MixtralPolicy",
    "Olmo2Policy",
    "OlmoePolicy",
    "BertPolicy",
]
