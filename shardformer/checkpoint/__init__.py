"""Checkpoints: HF directories from any layout, and sliced loading into any layout."""
from .load import load_pretrained
from .save import full_state_dict, save_pretrained

__all__ = ["full_state_dict", "load_pretrained", "save_pretrained"]
