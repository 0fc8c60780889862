"""Resumable training state: `save_checkpoint` / `load_checkpoint`, atomic, for any layout.

Each rank writes its own state (its model shards, its optimizer state, `sf.ZeroOptimizer`'s
included, the scheduler, the RNG states and the caller's `**state`, e.g. step and data position)
with `torch.save` into `<dir>/step-<n>.partial/rank<r>.pt`. Once every rank has written, rank 0
renames the directory to `step-<n>` and then replaces `<dir>/latest` (written beside and moved
over it, an atomic rename). A crash part-way leaves a `.partial` directory and `latest` still
naming the previous checkpoint, which `load_checkpoint` reads. Resuming needs the same layout
(use `sf.save_pretrained` and `ZeroOptimizer.consolidated_state_dict` to change it).
torch.distributed.checkpoint is not used: it loads in place into existing tensors, and an
optimizer has no state before its first step.
"""
from __future__ import annotations

import os
import random
import shutil

import torch
import torch.distributed as dist

from ..comm import all_or_none

_LATEST = "latest"
_before_commit = None  # tests: called on every rank after writing, before the rename


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout(model) -> dict:
    return {"world": dist.get_world_size(), "config": repr(model.sf_config)}


def save_checkpoint(directory, model, optimizer, scheduler=None, *, step: int, **state) -> str:
    """Write this rank's training state as checkpoint `step` (see module docstring); returns its
    directory. Every rank must call it; it succeeds on every rank or raises on every rank."""
    final = os.path.join(directory, f"step-{step}")
    partial = final + ".partial"
    with all_or_none(None, "sf.save_checkpoint"):
        if dist.get_rank() == 0:
            os.makedirs(directory, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
    with all_or_none(None, "sf.save_checkpoint"):
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": None if scheduler is None else scheduler.state_dict(), "rng": _rng_state(),
                   "state": dict(state, step=step), "layout": _layout(model)}
        torch.save(payload, os.path.join(partial, f"rank{dist.get_rank():05d}.pt"))
        if _before_commit is not None:
            _before_commit()
    with all_or_none(None, "sf.save_checkpoint"):
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            pointer = os.path.join(directory, _LATEST + ".tmp")
            with open(pointer, "w") as f:
                f.write(os.path.basename(final))
            os.replace(pointer, os.path.join(directory, _LATEST))
    return final


def latest_checkpoint(directory) -> str | None:
    """The committed checkpoint `latest` names in `directory`, or None."""
    pointer = os.path.join(directory, _LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(directory, f.read().strip())
    return path if os.path.isdir(path) else None


def load_checkpoint(directory, model, optimizer=None, scheduler=None) -> dict:
    """Restore the latest committed checkpoint of `directory` into `model`, `optimizer` and
    `scheduler` (and the RNG states); returns the caller's saved state (with `step`). ValueError,
    on every rank, when there is none or it was saved on another layout."""
    payload = None
    with all_or_none(None, "sf.load_checkpoint"):
        path = latest_checkpoint(directory)
        if path is None:
            raise ValueError(f"sf.load_checkpoint: no committed checkpoint in {directory!r} (nothing to resume)")
        payload = torch.load(os.path.join(path, f"rank{dist.get_rank():05d}.pt"), weights_only=False)
        if payload["layout"] != _layout(model):
            raise ValueError(f"sf.load_checkpoint: {path} was saved on another layout ({payload['layout']}); this "
                             f"run is {_layout(model)}")
        model.load_state_dict(payload["model"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload["scheduler"] is not None:
            scheduler.load_state_dict(payload["scheduler"])
        _set_rng_state(payload["rng"])
    return payload["state"]
