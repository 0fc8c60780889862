"""Vocab-parallel cross-entropy: the loss of vocab-split logits without gathering them.

Each tp rank holds logits [N, V_r] for the token range [vocab_start, vocab_start + V_r).
    forward: all-reduce (max) of the row maxima, all-reduce (sum) of the exp-sums and of the
             target logit (each target lives on exactly one rank); loss = log(sum exp) - target
    backward: no collective; dL/dlogits = (softmax - onehot(target)) * dL/dloss on the local slice

`causal_lm_loss` is installed as the model's `loss_function` and reproduces transformers'
ForCausalLM loss: labels shifted left by one with `ignore_index` appended (or `shift_labels`
used as given), mean over non-ignored targets, or sum / `num_items_in_batch` when given.
`fused_causal_lm_loss` is the same loss computed from the LM head's input (hidden states) with
the fused linear + cross-entropy: the logits are never materialised. `LOSSES` maps a policy's
`loss` name to the function installed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..comm import all_reduce_no_grad, group_size
from ..kernels.ops import linear_cross_entropy


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, group, ignore_index):
        n_local = logits.shape[-1]
        if n_local == 0:  # a rank whose vocabulary slice is all padding holds no logits
            logits = logits.new_full((*logits.shape[:-1], 1), float("-inf"))
        row_max = all_reduce_no_grad(logits.max(dim=-1).values, group, "max")
        shifted = logits - row_max.unsqueeze(-1)
        local_t = target - vocab_start
        here = (local_t >= 0) & (local_t < n_local)
        local_t = local_t.masked_fill(~here, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~here, 0.0)
        exp = shifted.exp_()
        sum_exp = all_reduce_no_grad(exp.sum(dim=-1), group, "sum")
        target_logit = all_reduce_no_grad(target_logit, group, "sum")
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax[..., :n_local], local_t, here & valid, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, hit, valid = ctx.saved_tensors
        grad = softmax.clone()
        if grad.shape[-1]:  # a slice that is all padding holds no logits and no target
            grad.scatter_add_(-1, local_t.unsqueeze(-1), -hit.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, vocab_start: int, group, ignore_index: int = -100):
    """Per-row cross-entropy (0 where target == ignore_index) of vocab-split fp32 logits [N, V_r]."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, group, ignore_index)


def shift_causal_labels(labels, shift_labels=None, ignore_index: int = -100):
    """Flat targets of a causal LM, as transformers builds them: `labels` shifted left by one with
    `ignore_index` appended, or `shift_labels` as given."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def check_targets(targets, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise (device-side on CUDA, no host sync) on a target outside [0, vocab_size) that is not
    ignore_index, as F.cross_entropy does; a vocab-split loss would otherwise ignore it silently."""
    ok = ((targets >= 0) & (targets < vocab_size)) | (targets == ignore_index)
    torch._assert_async(ok.all(), f"label out of range for a vocabulary of {vocab_size} tokens")


def reduce_token_losses(total, targets, num_items_in_batch=None, ignore_index: int = -100):
    """transformers' reduction of a summed token loss: / #non-ignored targets, or / num_items_in_batch."""
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(
    logits,
    labels,
    vocab_size=None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels=None,
    *,
    head,
    **kwargs,
):
    """transformers' causal-LM loss computed on `head`'s vocab-split logits (see module docstring)."""
    logits = logits.float()
    logits = logits.reshape(logits.shape[:-1].numel(), logits.shape[-1])  # explicit: the slice may be empty
    targets = shift_causal_labels(labels, shift_labels, ignore_index).to(logits.device)
    check_targets(targets, head.vocab_size, ignore_index)
    per_row = vocab_parallel_cross_entropy(logits, targets, head.vocab_start, head.group, ignore_index)
    return reduce_token_losses(per_row.sum(), targets, num_items_in_batch, ignore_index)


def fused_causal_lm_loss(hidden, head, labels, shift_labels=None, num_items_in_batch=None, ignore_index: int = -100):
    """transformers' causal-LM loss of `head` (a `VocabParallelLMHead`) applied to `hidden`
    ([..., H], the head's input), with the fused linear + cross-entropy (chunked; the logits of
    all tokens never exist at once). Same value and gradients as `causal_lm_loss` on the logits."""
    targets = shift_causal_labels(labels, shift_labels, ignore_index).to(hidden.device)
    check_targets(targets, head.vocab_size, ignore_index)
    total_or_mean = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, targets, ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
        process_group=head.group if group_size(head.group) > 1 else None,
        vocab_start=head.vocab_start, vocab_size=head.vocab_size,
        reduce_grad_hidden=head.copy_input,  # False: a sequence-parallel gather reduces it
    )
    if num_items_in_batch is None:
        return total_or_mean
    return reduce_token_losses(total_or_mean, targets, num_items_in_batch, ignore_index)


LOSSES = {"causal_lm": causal_lm_loss}
