"""`sf.split_batch`: a data loader of a sequence-parallel model reads only this rank's shard.

A sharded model takes the whole batch on every rank of its sequence group and splits it inside.
A loader that wants to read less calls `split_batch(batch, model)`: every token-level tensor
(`SEQUENCE_KEYS`) is cut along the sequence (dimension 1) into this rank's chunk, exactly as the
model splits its hidden states (zero-padded to a multiple of the split; ring: the zig-zag chunks),
and the true length travels as `batch["sf_sequence_length"]`. The model all-gathers these token
tensors over the sequence group before anything else (`gather_batch`; a few bytes per token, no
autograd): transformers builds the causal mask, the positions and the label shift from the whole
sequence, so position ids are the global ones and the loss is the one of the whole batch.

Every rank of a sequence group must pass a split batch or none, of one length: the first
exchange of the call (the batch check, or `forward_backward`'s validation over the world) then
compares the shards' structure (names, dtypes, shapes, the length), so a mix of split and whole
batches, or of lengths, is a ValueError on every rank instead of a hang.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import pad_to_multiple
from .ring import _natural_order, zigzag_chunk

SPLIT_KEY = "sf_sequence_length"
SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "labels", "shift_labels", "position_ids",
                 "token_type_ids")


def _sequence_layout(model) -> tuple[object, int, int, bool]:
    """(group, size, rank, zigzag) of the model's sequence split; ValueError without one."""
    config = getattr(model, "sf_config", None)
    if config is None:
        raise ValueError("sf.split_batch(batch, model): model must be returned by sf.shard_model")
    if config.sp_mode is None:
        raise ValueError("sf.split_batch: the model was sharded without sequence parallelism "
                         "(ShardConfig.sp_mode=None): pass it the whole batch")
    axis = "tp" if config.sp_mode == "split_gather" else "sp"
    groups = model.sf_groups
    return groups.mesh.get_group(axis), groups.size(axis), groups.mesh.get_local_rank(axis), config.sp_mode == "ring"


def split_batch(batch: dict, model) -> dict:
    """This rank's shard of `batch` (a dict of model arguments) for a model sharded with
    `ShardConfig.sp_mode`: each tensor of `SEQUENCE_KEYS` cut along dimension 1 into this rank's
    chunk of the sequence (the model's own split), the other entries as they are, plus the
    sequence length under "sf_sequence_length". Pass the result to `model.forward_backward`,
    `model.forward_loss` or `model(...)`. Local: no collective."""
    if not isinstance(batch, dict):
        raise ValueError(f"sf.split_batch takes a dict of model arguments, got {type(batch).__name__}")
    group, size, rank, zigzag = _sequence_layout(model)
    if SPLIT_KEY in batch:
        raise ValueError("sf.split_batch: this batch is split already (it has 'sf_sequence_length')")
    source = next((batch[k] for k in ("input_ids", "inputs_embeds") if torch.is_tensor(batch.get(k))), None)
    if source is None or source.dim() < 2:
        raise ValueError("sf.split_batch needs input_ids [batch, sequence] or inputs_embeds [batch, sequence, hidden]")
    length = source.shape[1]
    shard = dict(batch)
    for key in SEQUENCE_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if not torch.is_tensor(value) or value.dim() < 2 or value.shape[1] != length:
            raise ValueError(f"sf.split_batch: {key} must be a tensor [batch, sequence={length}, ...], got "
                             f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}")
        if value.requires_grad:
            raise ValueError(f"sf.split_batch: {key} requires grad; split only data (the model gathers it without "
                             "autograd)")
        shard[key] = (zigzag_chunk(value, 1, size, rank) if zigzag else
                      pad_to_multiple(value, 1, size).chunk(size, dim=1)[rank]).contiguous()
    shard[SPLIT_KEY] = length
    return shard


@torch.no_grad()
def gather_batch(batch: dict, model) -> dict:
    """The whole batch from every rank's `split_batch` shard (all-gathers over the sequence
    group); a batch without "sf_sequence_length" is returned as it is."""
    if SPLIT_KEY not in batch:
        return batch
    group, size, _, zigzag = _sequence_layout(model)
    whole = dict(batch)
    length = whole.pop(SPLIT_KEY)
    chunk = None
    if isinstance(length, int) and length > 0:  # the shard's length: the split's padded chunk
        chunk = 2 * -(-length // (2 * size)) if zigzag else -(-length // size)
    present = [key for key in SEQUENCE_KEYS if whole.get(key) is not None]
    wrong = [key for key in present if not torch.is_tensor(whole[key]) or whole[key].dim() < 2 or
             whole[key].shape[1] != chunk]
    if chunk is None or wrong or not present:
        raise ValueError(f"sf_sequence_length={length!r} does not match this batch's shard ({wrong or 'no sequence'}): "
                         "pass the dict sf.split_batch returned, unchanged")
    for key in present:
        value = whole[key]
        parts = [torch.empty_like(value) for _ in range(size)]
        dist.all_gather(parts, value.contiguous(), group=group)
        joined = torch.cat(parts, dim=1)
        whole[key] = (_natural_order(joined, 1, size) if zigzag else joined).narrow(1, 0, length)
    return whole
