"""One call of an sp-axis model (Ulysses, ring): its inputs split, its loss and outputs made whole.

`SequenceCalls.validate(kwargs)` runs first, before the call's batch check (its first collective):
  * ring takes a padding mask only as right padding the loss ignores (`_ring_padding_error`);
  * the KV cache: a call that brings one or asks for it (`generate`) is refused.
`SequenceCalls.prepare(kwargs, args)` runs before HF's forward:
  * labels: shifted on the whole sequence (or `shift_labels` as given), padded with the ignore
    index to a multiple of sp (2 sp for ring), and this rank's chunk (ring: zig-zag chunks)
    passed as `shift_labels`; the count of
    targets of the whole batch goes as `num_items_in_batch` (unless given), so each rank's loss
    is the sum over its tokens divided by the whole batch's count;
  * the KV cache is off (`use_cache=False`);
  * `logits_to_keep` is applied after the logits are gathered (each rank holds a chunk).
`finish(model, out, prepared)` runs after it:
  * the loss: the ranks' parts summed over sp (backward: times sp, the gradient convention of
    `ulysses.py`);
  * logits without labels: gathered along the sequence (cut to its true length).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..comm import gather_seq, sum_over
from .ring import zigzag_chunk, zigzag_gather
from .ulysses import SEQ_DIM


def _targets(kwargs: dict, labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(the ignore index, each position's target): `shift_labels` as given, else the labels
    shifted left by one on the whole sequence (the last position: the ignore index)."""
    ignore = kwargs.get("ignore_index", -100)
    targets = kwargs.get("shift_labels")
    return ignore, (F.pad(labels, (0, 1), value=ignore)[..., 1:] if targets is None else targets)


class SequenceCalls:
    """Per-call input / output handling of an sp-axis model (all_to_all, or ring with `zigzag`
    placement); holds no per-call state."""

    def __init__(self, group, sp: int, rank: int, has_lm_head: bool, zigzag: bool = False):
        self.group, self.sp, self.rank, self.has_lm_head, self.zigzag = group, sp, rank, has_lm_head, zigzag

    def validate(self, kwargs: dict) -> None:
        """Refuse, before any collective of the call, what this mode cannot run (ValueError)."""
        mask = kwargs.get("attention_mask")
        if self.zigzag and torch.is_tensor(mask) and not bool(mask.all()):
            why = self._ring_padding_error(kwargs, mask)
            if why:
                raise ValueError("sp_mode='ring' supports a padding mask only as right padding (each row's zeros "
                                 f"at its end) that the loss ignores: this batch's attention_mask {why}; use "
                                 "sp_mode='all_to_all' or 'split_gather' for other padded batches")
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("this sp_mode does not support a KV cache (generate, use_cache=True); run generation "
                             "on a model sharded without sequence parallelism")

    def _ring_padding_error(self, kwargs: dict, mask: torch.Tensor) -> str:
        """Why ring attention (causal, no mask) would not compute what HF computes with `mask`, or
        "" when it does: with right padding no real token sees a padded one (they come after it),
        so only the outputs at padded positions differ, and those predict no target of the loss
        and get no gradient."""
        if mask.dim() != 2:
            return f"is {mask.dim()}-D, not [batch, sequence]"
        real = mask.bool()
        if (real[:, 1:] & ~real[:, :-1]).any():
            return "has a zero before a one (left or inner padding)"
        labels = kwargs.get("labels")
        if labels is None or not self.has_lm_head:
            return "has zeros and the call computes no LM loss (its outputs at padded positions would differ)"
        ignore, targets = _targets(kwargs, labels)
        if targets.shape != real.shape or (targets[~real] != ignore).any():
            return (f"has zeros where the targets are not the ignore index ({ignore}): set the labels at padded "
                    "positions to it")
        return ""

    def prepare(self, kwargs: dict, args: tuple) -> tuple[dict, int]:
        """(the kwargs to call HF with, the true sequence length); `validate` ran before."""
        source = kwargs.get("input_ids", args[0] if args else None)
        if source is None:
            source = kwargs.get("inputs_embeds")
        full = source.shape[1]
        kwargs = dict(kwargs, use_cache=False)
        keep = kwargs.pop("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            kwargs["sf_logits_to_keep"] = keep
        labels = kwargs.get("labels")
        if labels is not None and self.has_lm_head:
            ignore, targets = _targets(kwargs, labels)
            if kwargs.get("num_items_in_batch") is None:
                kwargs["num_items_in_batch"] = (targets != ignore).sum()
            if self.zigzag:
                padded = F.pad(targets, (0, -targets.shape[-1] % (2 * self.sp)), value=ignore)
                kwargs["shift_labels"] = zigzag_chunk(padded, -1, self.sp, self.rank).contiguous()
            else:
                padded = F.pad(targets, (0, -targets.shape[-1] % self.sp), value=ignore)
                kwargs["shift_labels"] = padded.chunk(self.sp, dim=-1)[self.rank].contiguous()
        return kwargs, full

    def finish(self, out, kwargs: dict, full: int):
        """The whole loss and, without labels, the whole sequence of logits."""
        if getattr(out, "loss", None) is not None and self.has_lm_head:
            out.loss = sum_over(out.loss, self.group, grad_scale=self.sp)
        logits = getattr(out, "logits", None)
        if logits is not None and kwargs.get("labels") is None and self.has_lm_head:
            logits = self.gather(logits, full)
            keep = kwargs.get("sf_logits_to_keep", 0)
            if isinstance(keep, int):
                out.logits = logits[:, -keep:] if keep else logits
            else:  # a tensor of positions, as transformers takes it
                out.logits = logits[:, keep]
        return out

    def gather(self, x, full: int):
        """The whole sequence of `x` (cut to `full`); backward: each rank keeps its chunk, times sp."""
        if self.zigzag:
            return zigzag_gather(x, SEQ_DIM, full, self.group, grad_scale=self.sp)
        return gather_seq(x, SEQ_DIM, full, self.group, reduce_grad=False, grad_scale=self.sp)


def gather_hidden_hook(calls: SequenceCalls, length):
    """Forward hook for the final norm of a model without a vocab-parallel LM head: its output is
    gathered along the sequence (backward: each rank keeps its chunk, times sp)."""

    def hook(module, args, output):
        return calls.gather(output, length.full)

    return hook
