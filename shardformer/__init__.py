"""shardformer: tensor, sequence and pipeline parallel training of unmodified
Hugging Face transformers models. See README.md and DESIGN.md."""
from . import pipeline, policies
from .api import shard_model
from .checkpoint import full_state_dict, save_pretrained
from .config import ShardConfig
from .mesh import build_mesh


def load_pretrained(*args, **kwargs):
    """Per-rank sliced loading is not built yet (it has its own issue); use
    `shard_model(AutoModelForCausalLM.from_pretrained(path), config=cfg)` meanwhile."""
    raise NotImplementedError("sf.load_pretrained is not built yet: use shard_model(from_pretrained(...))")


class ZeroOptimizer:
    """The ZeRO optimizer is not built yet (it has its own issue); use the plain optimizer with
    ShardConfig(zero_stage=0) meanwhile."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("sf.ZeroOptimizer is not built yet: use the plain optimizer (zero_stage=0)")


__all__ = [
    "ShardConfig",
    "shard_model",
    "save_pretrained",
    "load_pretrained",
    "full_state_dict",
    "build_mesh",
    "ZeroOptimizer",
    "policies",
    "pipeline",
]
__version__ = "0.1.0"
