"""shardformer: tensor, sequence and pipeline parallel training of unmodified
Hugging Face transformers models. See README.md and DESIGN.md."""
from . import pipeline, policies
from .api import shard_model
from .checkpoint import (full_state_dict, init_model, load_checkpoint, load_pretrained, save_checkpoint,
                         save_pretrained)
from .config import ShardConfig
from .data_parallel import ZeroOptimizer
from .mesh import build_mesh
from .policies import infer_policy
from .sequence_parallel.batch import split_batch


__all__ = [
    "ShardConfig",
    "shard_model",
    "save_pretrained",
    "load_pretrained",
    "init_model",
    "save_checkpoint",
    "load_checkpoint",
    "full_state_dict",
    "build_mesh",
    "ZeroOptimizer",
    "split_batch",
    "policies",
    "infer_policy",
    "pipeline",
]
__version__ = "0.1.0"
