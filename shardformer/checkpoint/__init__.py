"""Checkpoints: HF directories from any layout, sliced loading into any layout, and models
initialised directly as shards."""
from .init import init_model
from .load import load_pretrained
from .save import full_state_dict, save_pretrained

__all__ = ["full_state_dict", "init_model", "load_pretrained", "save_pretrained"]
