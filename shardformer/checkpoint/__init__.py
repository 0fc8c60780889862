"""Checkpoints: HF directories from any layout, sliced loading into any layout, models initialised
directly as shards, and resumable training state."""
from .init import init_model
from .load import load_pretrained, load_weights
from .resume import latest_checkpoint, load_checkpoint, save_checkpoint
from .save import full_state_dict, save_pretrained

__all__ = ["full_state_dict", "init_model", "latest_checkpoint", "load_checkpoint", "load_pretrained",
           "load_weights", "save_checkpoint", "save_pretrained"]
