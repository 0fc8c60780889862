"""Checkpoints: HF directories from any layout (sliced loading and resumable state come here)."""
from .save import full_state_dict, save_pretrained

__all__ = ["full_state_dict", "save_pretrained"]
