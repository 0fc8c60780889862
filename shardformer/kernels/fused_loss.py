"""Fused LM-head + cross-entropy in training: the full logits are never materialised.

The seam is hooks (run by the sharded model's forward wrapper, with nn.Module forward-hook
conventions), not a copied forward. When the model is called in training mode with
`labels` (and grad enabled, `return_dict` not False, `logits_to_keep` 0):
  1. a pre-hook on the model takes `labels` (and `shift_labels`, `num_items_in_batch`,
     `ignore_index`) out of the call, so transformers computes no loss of its own;
  2. the vocab-parallel LM head, asked to capture, keeps its input hidden states and returns an
     empty [..., 0] tensor instead of logits;
  3. a post-hook computes the loss with `linear_cross_entropy` from the captured hidden
     states and the head's (vocab-split) weight, exactly as transformers' causal-LM loss, and
     returns the model's output with `loss` set and `logits=None`.
Evaluation (`model.eval()`), calls without labels, and everything else run unchanged.
"""
from __future__ import annotations

import torch

from ..layers.comm import group_size
from ..layers.loss import check_targets, reduce_token_losses, shift_causal_labels
from .ops import linear_cross_entropy

_TAKEN = ("labels", "shift_labels", "num_items_in_batch", "ignore_index")


def install_fused_lm_loss(model: torch.nn.Module, head) -> None:
    """Route `model`'s training loss through the fused linear + cross-entropy of `head`
    (a `VocabParallelLMHead`); see the module docstring."""

    def before(module, args, kwargs):
        head.sf_pending, head.sf_capture, head.sf_captured = None, False, None  # a call that raised
        if (kwargs.get("labels") is None or not module.training or not torch.is_grad_enabled()
                or kwargs.get("return_dict") is False or kwargs.get("logits_to_keep", 0) != 0):
            return None
        kwargs = dict(kwargs)
        head.sf_pending = {name: kwargs.pop(name) for name in _TAKEN if name in kwargs}
        head.sf_capture = True
        return args, kwargs

    def after(module, args, kwargs, output):
        pending = getattr(head, "sf_pending", None)
        if pending is None:
            return output
        hidden, head.sf_pending, head.sf_capture, head.sf_captured = head.sf_captured, None, False, None
        ignore_index = pending.get("ignore_index", -100)
        targets = shift_causal_labels(pending["labels"], pending.get("shift_labels"), ignore_index)
        targets = targets.to(hidden.device)
        check_targets(targets, head.vocab_size, ignore_index)
        num_items = pending.get("num_items_in_batch")
        total_or_mean = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, targets, ignore_index=ignore_index,
            reduction="mean" if num_items is None else "sum",
            process_group=head.group if group_size(head.group) > 1 else None,
            vocab_start=head.vocab_start, vocab_size=head.vocab_size,
        )
        loss = total_or_mean if num_items is None else reduce_token_losses(total_or_mean, targets, num_items)
        fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
        return type(output)(loss=loss, logits=None, **fields)

    model.sf_pre_hooks.append(before)
    model.sf_post_hooks.insert(0, after)  # before the logits gather, which it makes moot
